// Routed LoRA on the CPU without gathered copies or padding (the ``cpp`` implementation, see cpp.py).
//
// Pairs (token n, slot j) -> flat pair p = n * k + j, expert e = ids[p], weight w[p] (scaling folded in). The
// schedule checks every id against [0, E) first (moa_lora_schedule returns the first bad pair; the caller raises).
// The schedule orders the pairs by slot, then expert, then token (a counting sort): within one slot every token
// appears exactly once, so a pass over one slot's expert groups in parallel writes each output row from one thread
// (no atomics), and slot 0's pass initialises every row (no zero fill).
//
//   forward   h[p]  = A[e] x[n]                      (dot form, rows of x read by index)
//             y[n]  = y0[n] + sum_j w[p] Bt[e]^T h[p]  (axpy form into the output row)
//   backward  pass 1, parallel over experts (each expert's pairs of all slots together, so its dy rows are read
//             from memory once and are still in L2 for dB):
//             g[p]  = Bt[e] dy[n],  dw[p] = h[p] . g[p],  dh[p] = w[p] g[p],  hw[p] = w[p] h[p]
//             dB[e] = sum_{p in e} dy[n] hw[p]^T  (written in B's own strided layout),  dA[e] = sum_{p in e} dh[p] x[n]^T
//             pass 2, slot by slot, parallel over the slot's experts:  dx[n] = sum_j A[e]^T dh[p]
//   routed gate (optional): the weights are the softmax of the k selected logits Wg[e] . x[n]; given their gradient
//             dl[p], dWg[e] = sum_{p in e} dl[p] x[n] (with dA, one read of the x rows) and dx[n] += sum_j dl[p] Wg[e]
//
// A is [E, r, d_in] and Bt = B^T is [E, r, d_out], both contiguous; the rows of x / y0 / y / dy / dx have unit
// stride and a row stride of their own. Plain C entry points (no torch headers: the build takes seconds), float and
// double. Vectors are GCC vector extensions sized for the target (-march=native): 64 bytes with AVX-512.

#include <cstdint>
#include <cstring>
#include <vector>
#include <omp.h>

namespace {

#if defined(__AVX512F__)
constexpr int VBYTES = 64;
#elif defined(__AVX__)
constexpr int VBYTES = 32;
#else
constexpr int VBYTES = 16;
#endif

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(VBYTES)));
  static constexpr int W = VBYTES / 4;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(VBYTES)));
  static constexpr int W = VBYTES / 8;
};

template <typename V, typename T>
inline V vload(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T>
inline void vstore(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}
template <typename T>
inline T hsum(const typename Vec<T>::type& v) {
  T s = 0;
  for (int l = 0; l < Vec<T>::W; ++l) s += v[l];
  return s;
}


// s[j] = hsum(v[j]) for 16 vectors: with 16 float lanes (AVX-512), four levels of pairwise shuffles and adds (45
// vector ops instead of 240 scalar adds; lane L of the result holds the sum of v[bitreverse4(L)]); else scalar sums.
template <typename T>
inline void reduce16(const typename Vec<T>::type* v, T* s) {
  for (int j = 0; j < 16; ++j) s[j] = hsum<T>(v[j]);
}

#if defined(__AVX512F__)
template <>
inline void reduce16<float>(const Vec<float>::type* v, float* s) {
  typedef Vec<float>::type V;
  typedef int32_t I __attribute__((vector_size(64)));
  const I lo1 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const I hi1 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
  const I lo2 = {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27};
  const I hi2 = {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31};
  const I lo3 = {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29};
  const I hi3 = {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31};
  const I lo4 = {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30};
  const I hi4 = {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31};
  V u[8], w[4], z[2];
  for (int m = 0; m < 8; ++m)
    u[m] = __builtin_shuffle(v[2 * m], v[2 * m + 1], lo1) + __builtin_shuffle(v[2 * m], v[2 * m + 1], hi1);
  for (int m = 0; m < 4; ++m)
    w[m] = __builtin_shuffle(u[2 * m], u[2 * m + 1], lo2) + __builtin_shuffle(u[2 * m], u[2 * m + 1], hi2);
  for (int m = 0; m < 2; ++m)
    z[m] = __builtin_shuffle(w[2 * m], w[2 * m + 1], lo3) + __builtin_shuffle(w[2 * m], w[2 * m + 1], hi3);
  const V R = __builtin_shuffle(z[0], z[1], lo4) + __builtin_shuffle(z[0], z[1], hi4);
  for (int L = 0; L < 16; ++L) s[((L & 1) << 3) | ((L & 2) << 1) | ((L & 4) >> 1) | ((L & 8) >> 3)] = R[L];
}
#endif

constexpr int MR = 4;  // pairs per tile
constexpr int NR = 4;  // rows of A / Bt per dot tile
constexpr int CH = 4;  // vectors per chunk of an axpy / outer-product tile

// out[i * ldo + q] = rows[i][0:d] . M[q * ldm + 0:d]   (i < MR, q < NQ)
template <typename T, int NQ>
inline void dot_tile(const T* const* rows, const T* M, int64_t ldm, int64_t d, T* out, int64_t ldo) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::W;
  V acc[MR][NQ];
  for (int i = 0; i < MR; ++i)
    for (int q = 0; q < NQ; ++q) acc[i][q] = V{};
  int64_t t = 0;
  for (; t + W <= d; t += W) {
    V m[NQ];
    for (int q = 0; q < NQ; ++q) m[q] = vload<V>(M + q * ldm + t);
    for (int i = 0; i < MR; ++i) {
      V xv = vload<V>(rows[i] + t);
      for (int q = 0; q < NQ; ++q) acc[i][q] += xv * m[q];
    }
  }
  if constexpr (MR * NQ == 16) {  // 16 sums at once: a shuffle tree (lane L holds sum bitrev4(L))
    T sums[16];
    reduce16<T>(&acc[0][0], sums);
    for (int i = 0; i < MR; ++i)
      for (int q = 0; q < NQ; ++q) {
        T s = sums[i * NQ + q];
        for (int64_t u = t; u < d; ++u) s += rows[i][u] * M[q * ldm + u];
        out[i * ldo + q] = s;
      }
    return;
  }
  for (int i = 0; i < MR; ++i)
    for (int q = 0; q < NQ; ++q) {
      T s = hsum<T>(acc[i][q]);
      for (int64_t u = t; u < d; ++u) s += rows[i][u] * M[q * ldm + u];
      out[i * ldo + q] = s;
    }
}

// tile[i * r + q] = rows[i] . M[q]  for all q < r
template <typename T>
inline void dots(const T* const* rows, const T* M, int64_t r, int64_t d, T* tile) {
  int64_t q = 0;
  for (; q + NR <= r; q += NR) dot_tile<T, NR>(rows, M + q * d, d, d, tile + q, r);
  for (; q < r; ++q) dot_tile<T, 1>(rows, M + q * d, d, d, tile + q, r);
}

// ys[i][0:d] = (srcs[i] ? srcs[i][0:d] : 0) + (bias ? bias[0:d] : 0) + sum_q c[i * r + q] * M[q * d + 0:d]
// for i < NP
template <typename T, int NP>
inline void axpy_tile(T* const* ys, const T* const* srcs, const T* bias, const T* c, int64_t r, const T* M,
                      int64_t d) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::W;
  int64_t t = 0;
  for (; t + CH * W <= d; t += CH * W) {
    V acc[NP][CH];
    for (int i = 0; i < NP; ++i)
      for (int u = 0; u < CH; ++u) acc[i][u] = srcs[i] ? vload<V>(srcs[i] + t + u * W) : V{};
    if (bias)
      for (int u = 0; u < CH; ++u) {
        const V b = vload<V>(bias + t + u * W);
        for (int i = 0; i < NP; ++i) acc[i][u] += b;
      }
    for (int64_t q = 0; q < r; ++q) {
      V m[CH];
      for (int u = 0; u < CH; ++u) m[u] = vload<V>(M + q * d + t + u * W);
      for (int i = 0; i < NP; ++i) {
        const T ci = c[i * r + q];
        for (int u = 0; u < CH; ++u) acc[i][u] += m[u] * ci;
      }
    }
    for (int i = 0; i < NP; ++i)
      for (int u = 0; u < CH; ++u) vstore(ys[i] + t + u * W, acc[i][u]);
  }
  for (; t + W <= d; t += W) {
    V acc[NP];
    for (int i = 0; i < NP; ++i) acc[i] = srcs[i] ? vload<V>(srcs[i] + t) : V{};
    if (bias)
      for (int i = 0; i < NP; ++i) acc[i] += vload<V>(bias + t);
    for (int64_t q = 0; q < r; ++q) {
      V m = vload<V>(M + q * d + t);
      for (int i = 0; i < NP; ++i) acc[i] += m * c[i * r + q];
    }
    for (int i = 0; i < NP; ++i) vstore(ys[i] + t, acc[i]);
  }
  for (; t < d; ++t)
    for (int i = 0; i < NP; ++i) {
      T s = srcs[i] ? srcs[i][t] : T(0);
      if (bias) s += bias[t];
      for (int64_t q = 0; q < r; ++q) s += M[q * d + t] * c[i * r + q];
      ys[i][t] = s;
    }
}

// G[q * d + 0:d] = sum over the listed pairs p of c[p * r + q] * v[tok(p) * ldv + 0:d]   for q in [q0, q0 + NQ)
template <typename T, int NQ>
inline void outer_rows(const int64_t* pairs, int64_t np, int64_t k, const T* c, int64_t r, int64_t q0, const T* v,
                       int64_t ldv, int64_t d, T* G) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::W;
  int64_t t = 0;
  for (; t + CH * W <= d; t += CH * W) {
    V acc[NQ][CH];
    for (int q = 0; q < NQ; ++q)
      for (int u = 0; u < CH; ++u) acc[q][u] = V{};
    for (int64_t a = 0; a < np; ++a) {
      const int64_t p = pairs[a];
      const T* vr = v + (p / k) * ldv + t;
      V xv[CH];
      for (int u = 0; u < CH; ++u) xv[u] = vload<V>(vr + u * W);
      for (int q = 0; q < NQ; ++q) {
        const T cq = c[p * r + q0 + q];
        for (int u = 0; u < CH; ++u) acc[q][u] += xv[u] * cq;
      }
    }
    for (int q = 0; q < NQ; ++q)
      for (int u = 0; u < CH; ++u) vstore(G + (q0 + q) * d + t + u * W, acc[q][u]);
  }
  for (; t + W <= d; t += W) {
    V acc[NQ];
    for (int q = 0; q < NQ; ++q) acc[q] = V{};
    for (int64_t a = 0; a < np; ++a) {
      const int64_t p = pairs[a];
      V xv = vload<V>(v + (p / k) * ldv + t);
      for (int q = 0; q < NQ; ++q) acc[q] += xv * c[p * r + q0 + q];
    }
    for (int q = 0; q < NQ; ++q) vstore(G + (q0 + q) * d + t, acc[q]);
  }
  for (; t < d; ++t)
    for (int q = 0; q < NQ; ++q) {
      T s = 0;
      for (int64_t a = 0; a < np; ++a) {
        const int64_t p = pairs[a];
        s += v[(p / k) * ldv + t] * c[p * r + q0 + q];
      }
      G[(q0 + q) * d + t] = s;
    }
}

// G[e] (r x d) = sum_{p in expert e} c[p] v[tok(p)]^T
template <typename T>
inline void outer(const int64_t* pairs, int64_t np, int64_t k, const T* c, int64_t r, const T* v, int64_t ldv,
                  int64_t d, T* G) {
  int64_t q = 0;
  for (; q + NR <= r; q += NR) outer_rows<T, NR>(pairs, np, k, c, r, q, v, ldv, d, G);
  for (; q < r; ++q) outer_rows<T, 1>(pairs, np, k, c, r, q, v, ldv, d, G);
}

// The same sums written in B's own layout: b[o * sO + q * sQ] = sum_{p} c[p * r + q] v[tok(p) * ldv + o]. Blocks of
// one chunk of columns through a small buffer G (r x CH*W): each block's rows of v stay in L1 for all r ranks, and
// the gradient reaches the pool's lora_B layout without a dBt buffer and a transpose pass.
template <typename T>
inline void outer_to_b(const int64_t* pairs, int64_t np, int64_t k, const T* c, int64_t r, const T* v, int64_t ldv,
                       int64_t d, T* b, int64_t sO, int64_t sQ, T* G) {
  constexpr int64_t OB = CH * Vec<T>::W;
  for (int64_t o0 = 0; o0 < d; o0 += OB) {
    const int64_t w = d - o0 < OB ? d - o0 : OB;
    for (int64_t o = o0 + OB; o < o0 + 2 * OB && o < d; ++o) __builtin_prefetch(b + o * sO, 1);  // next block's lines
    outer<T>(pairs, np, k, c, r, v + o0, ldv, w, G);
    for (int64_t o = 0; o < w; ++o)
      for (int64_t q = 0; q < r; ++q) b[(o0 + o) * sO + q * sQ] = G[q * w + o];
  }
}

// Counting sort of the pairs by (slot, expert), tokens ascending within a group. starts: k * E + 1 entries.
// Returns -1, or the first pair whose expert id is outside [0, E) (then nothing is written): the ids index the
// counts here and A / Bt in every pass, and plans built without validation (the router's top-k) reach this point.
int64_t build_schedule(const int64_t* ids, int64_t n, int64_t k, int64_t E, int64_t* sched, int64_t* starts) {
  for (int64_t p = 0; p < n * k; ++p)
    if (ids[p] < 0 || ids[p] >= E) return p;
  std::vector<int64_t> fill(k * E + 1, 0);
  for (int64_t p = 0; p < n * k; ++p) fill[(p % k) * E + ids[p] + 1]++;
  for (int64_t g = 0; g < k * E; ++g) fill[g + 1] += fill[g];
  std::memcpy(starts, fill.data(), sizeof(int64_t) * (k * E + 1));
  for (int64_t p = 0; p < n * k; ++p) sched[fill[(p % k) * E + ids[p]]++] = p;
  return -1;
}

// Expert-major list of the pairs (slot groups of one expert concatenated) and its offsets: E + 1 entries.
void by_expert(const int64_t* sched, const int64_t* starts, int64_t k, int64_t E, int64_t* list, int64_t* off) {
  int64_t at = 0;
  for (int64_t e = 0; e < E; ++e) {
    off[e] = at;
    for (int64_t j = 0; j < k; ++j)
      for (int64_t a = starts[j * E + e]; a < starts[j * E + e + 1]; ++a) list[at++] = sched[a];
  }
  off[E] = at;
}

template <typename T>
void forward(const T* x, int64_t ldx, const T* A, const T* Bt, const int64_t* sched, const int64_t* starts,
             const T* w, const T* y0, int64_t ld0, const T* bias, T* y, int64_t ldy, T* h, int64_t n, int64_t k,
             int64_t E, int64_t r, int64_t d_in, int64_t d_out, int nthreads) {
  (void)n;
  for (int64_t j = 0; j < k; ++j) {
    const T* bj = j ? nullptr : bias;  // slot 0 initialises every row: y0 + bias
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t e = 0; e < E; ++e) {
      const int64_t lo = starts[j * E + e], hi = starts[j * E + e + 1];
      const T* Ae = A + e * r * d_in;
      const T* Be = Bt + e * r * d_out;
      std::vector<T> tile(MR * r), hw(MR * r);
      for (int64_t a = lo; a < hi; a += MR) {
        const int64_t m = hi - a < MR ? hi - a : MR;
        const T* rows[MR];
        T* ys[MR];
        const T* srcs[MR];
        for (int i = 0; i < MR; ++i) {
          const int64_t tok = sched[a + (i < m ? i : m - 1)] / k;  // short tile: repeat the last row
          rows[i] = x + tok * ldx;
          ys[i] = y + tok * ldy;
          srcs[i] = j ? ys[i] : (y0 ? y0 + tok * ld0 : nullptr);
        }
        dots<T>(rows, Ae, r, d_in, tile.data());
        for (int64_t i = 0; i < m; ++i) {
          const int64_t p = sched[a + i];
          for (int64_t q = 0; q < r; ++q) {
            h[p * r + q] = tile[i * r + q];
            hw[i * r + q] = w[p] * tile[i * r + q];
          }
        }
        if (m == MR) {
          axpy_tile<T, MR>(ys, srcs, bj, hw.data(), r, Be, d_out);
        } else {
          for (int64_t i = 0; i < m; ++i) axpy_tile<T, 1>(ys + i, srcs + i, bj, hw.data() + i * r, r, Be, d_out);
        }
      }
    }
  }
}

// phase 0: everything below in one call. Routed gate (the weights are the softmax of the k selected gate logits
// l[p] = Wg[e] . x[n], their gradient dl[p] computed by the caller from dw between two calls): phase 1 is pass 1
// without dA (dh into the caller's buffer), phase 2 the expert pass dA[e] = sum dh[p] x[n]^T, dWg[e] = sum dl[p] x[n]
// (the x rows read once for both) and pass 2 with dx[n] += dl[p] Wg[e] for each of its pairs.
template <typename T>
void backward(const T* dy, int64_t lddy, const T* x, int64_t ldx, const T* A, const T* Bt, const int64_t* sched,
              const int64_t* starts, const T* w, const T* h, T* dx, T* dA, T* dB, int64_t sE, int64_t sO, int64_t sQ,
              T* dw, T* dh_buf, const T* dl, const T* Wg, T* dWg, int phase, int64_t n, int64_t k, int64_t E,
              int64_t r, int64_t d_in, int64_t d_out, int nthreads) {
  const int64_t P = n * k;
  std::vector<T> dh_own(dh_buf ? 0 : P * r), hw(phase == 2 ? 0 : P * r);
  T* dh = dh_buf ? dh_buf : dh_own.data();
  std::vector<int64_t> list(P), off(E + 1);
  by_expert(sched, starts, k, E, list.data(), off.data());
  // Pass 1, parallel over experts (all slots of one expert together): g, dw, dh, hw from the expert's dy rows, then
  // dB from the same rows while they are still in L2, then dA from the x rows. Each expert's sums run over its
  // pairs in the expert-major list order, whatever the thread count.
  if (phase != 2) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t e = 0; e < E; ++e) {
      const int64_t* pe = list.data() + off[e];
      const int64_t np = off[e + 1] - off[e];
      const T* Be = Bt + e * r * d_out;
      std::vector<T> tile(MR * r);
      for (int64_t a = 0; a < np; a += MR) {
        const int64_t m = np - a < MR ? np - a : MR;
        const T* rows[MR];
        for (int i = 0; i < MR; ++i) rows[i] = dy + (pe[a + (i < m ? i : m - 1)] / k) * lddy;
        dots<T>(rows, Be, r, d_out, tile.data());
        for (int64_t i = 0; i < m; ++i) {
          const int64_t p = pe[a + i];
          T s = 0;
          for (int64_t q = 0; q < r; ++q) {
            const T g = tile[i * r + q];
            s += h[p * r + q] * g;
            dh[p * r + q] = w[p] * g;
            hw[p * r + q] = w[p] * h[p * r + q];
          }
          if (dw) dw[p] = s;
        }
      }
      if (dB) {
        std::vector<T> G(r * CH * Vec<T>::W);
        outer_to_b<T>(pe, np, k, hw.data(), r, dy, lddy, d_out, dB + e * sE, sO, sQ, G.data());
      }
      if (dA && phase == 0) outer<T>(pe, np, k, dh, r, x, ldx, d_in, dA + e * r * d_in);
    }
  }
  if (phase == 1) return;
  if (phase == 2 && (dA || dWg)) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t e = 0; e < E; ++e) {
      const int64_t* pe = list.data() + off[e];
      const int64_t np = off[e + 1] - off[e];
      if (dA) outer<T>(pe, np, k, dh, r, x, ldx, d_in, dA + e * r * d_in);
      if (dWg) outer_rows<T, 1>(pe, np, k, dl, 1, 0, x, ldx, d_in, dWg + e * d_in);
    }
  }
  if (!dx) return;
  const bool gate = phase == 2 && dl && Wg;
  // Pass 2, dx[n] = sum_j A[e]^T dh[p] (+ dl[p] Wg[e]): slot by slot (each token once per slot), parallel over the
  // slot's experts.
  for (int64_t j = 0; j < k; ++j) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t e = 0; e < E; ++e) {
      const int64_t lo = starts[j * E + e], hi = starts[j * E + e + 1];
      const T* Ae = A + e * r * d_in;
      std::vector<T> c(MR * r);
      for (int64_t a = lo; a < hi; a += MR) {
        const int64_t m = hi - a < MR ? hi - a : MR;
        T* xs[MR];
        const T* srcs[MR];
        int64_t ps[MR];
        for (int i = 0; i < MR; ++i) {
          ps[i] = sched[a + (i < m ? i : m - 1)];
          xs[i] = dx + (ps[i] / k) * d_in;
          srcs[i] = j ? xs[i] : nullptr;
        }
        if (m == MR) {
          for (int i = 0; i < MR; ++i) std::memcpy(&c[i * r], &dh[ps[i] * r], sizeof(T) * r);
          axpy_tile<T, MR>(xs, srcs, nullptr, c.data(), r, Ae, d_in);
        } else {
          for (int64_t i = 0; i < m; ++i) axpy_tile<T, 1>(xs + i, srcs + i, nullptr, &dh[ps[i] * r], r, Ae, d_in);
        }
        if (gate)  // the gate row of the pair's expert, onto the row just written (still in L1)
          for (int64_t i = 0; i < m; ++i)
            axpy_tile<T, 1>(xs + i, xs + i, nullptr, dl + ps[i], 1, Wg + e * d_in, d_in);
      }
    }
  }
}

// to_bt: Bt[e, q, o] = B[e * sE + o * sO + q * sQ]; else the reverse (B in any strided layout, Bt contiguous).
// Tiles of TB outputs x TB ranks through a small buffer: every cache line of B or Bt a tile touches is used whole
// while it is in L1 (the pool's B has a row stride of E*r elements, often a multiple of 4 KiB: a loop that walks
// 64 rows of it per rank re-fetches lines that evicted each other from one cache set).
template <typename T>
void transpose_b(T* B, int64_t sE, int64_t sO, int64_t sQ, T* Bt, int64_t E, int64_t r, int64_t d_out, bool to_bt,
                 int nthreads) {
  constexpr int64_t TB = 16, PF_TILES = 8;
  const int64_t n_ob = (d_out + TB - 1) / TB;
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t eb = 0; eb < E * n_ob; ++eb) {
    const int64_t e = eb % E, o0 = (eb / E) * TB;  // along the rows of the pool layout: sequential reads
    const int64_t o1 = o0 + TB < d_out ? o0 + TB : d_out;
    T* bt = Bt + e * r * d_out;
    T* b = B + e * sE;
    T tmp[TB][TB];
    {  // prefetch a later tile's lines: the strided ones are cold and no hardware prefetcher predicts them
      const int64_t f = eb + PF_TILES;
      if (f < E * n_ob) {
        const int64_t fe = f % E, fo0 = (f / E) * TB;
        const int64_t fo1 = fo0 + TB < d_out ? fo0 + TB : d_out;
        if (to_bt) {
          for (int64_t o = fo0; o < fo1; ++o) __builtin_prefetch(B + fe * sE + o * sO, 0);
          for (int64_t q = 0; q < r; ++q) __builtin_prefetch(Bt + (fe * r + q) * d_out + fo0, 1);
        } else {
          for (int64_t o = fo0; o < fo1; ++o) __builtin_prefetch(B + fe * sE + o * sO, 1);
          for (int64_t q = 0; q < r; ++q) __builtin_prefetch(Bt + (fe * r + q) * d_out + fo0, 0);
        }
      }
    }
    for (int64_t q0 = 0; q0 < r; q0 += TB) {
      const int64_t q1 = q0 + TB < r ? q0 + TB : r;
      if (to_bt) {
        for (int64_t o = o0; o < o1; ++o)
          for (int64_t q = q0; q < q1; ++q) tmp[q - q0][o - o0] = b[o * sO + q * sQ];
        for (int64_t q = q0; q < q1; ++q)
          for (int64_t o = o0; o < o1; ++o) bt[q * d_out + o] = tmp[q - q0][o - o0];
      } else {
        for (int64_t q = q0; q < q1; ++q)
          for (int64_t o = o0; o < o1; ++o) tmp[o - o0][q - q0] = bt[q * d_out + o];
        for (int64_t o = o0; o < o1; ++o)
          for (int64_t q = q0; q < q1; ++q) b[o * sO + q * sQ] = tmp[o - o0][q - q0];
      }
    }
  }
}

// The gate's backward for a gradient of the logits that is zero but for a few entries per row (top-k routing
// without the load-balancing loss in the backward: the weights are the softmax of the k selected logits only):
//   dx[n] += sum_{e : dl[n, e] != 0} dl[n, e] Wg[e],   dWg[e] = sum_{n : dl[n, e] != 0} dl[n, e] x[n]
// The products of the dense form d_logits @ Wg, d_logits^T x with the exact zeros left out. Returns 0 (and writes
// nothing) when more than one entry in SPARSE_GATE_DIV is nonzero: the caller runs the dense GEMMs instead.
constexpr int64_t SPARSE_GATE_DIV = 8;
template <typename T>
int gate_backward_sparse(const T* dl, int64_t ldl, const T* x, int64_t ldx, const T* Wg, T* dx, int64_t lddx,
                         T* dWg, int64_t n, int64_t E, int64_t d, int nthreads) {
  int64_t nnz = 0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t e = 0; e < E; ++e) nnz += dl[i * ldl + e] != T(0);
  if (nnz * SPARSE_GATE_DIV > n * E) return 0;
  if (dx) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t i = 0; i < n; ++i) {
      T* __restrict__ row = dx + i * lddx;
      for (int64_t e = 0; e < E; ++e) {
        const T c = dl[i * ldl + e];
        if (c == T(0)) continue;
        const T* __restrict__ w = Wg + e * d;
        for (int64_t t = 0; t < d; ++t) row[t] += c * w[t];
      }
    }
  }
  if (dWg) {  // experts split in blocks, one per thread; each reads the tokens in order (thread-count independent)
    const int64_t nb = nthreads < E ? nthreads : E;
#pragma omp parallel for schedule(static, 1) num_threads(nthreads)
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t e0 = b * E / nb, e1 = (b + 1) * E / nb;
      std::memset(dWg + e0 * d, 0, sizeof(T) * (e1 - e0) * d);
      for (int64_t i = 0; i < n; ++i) {
        const T* __restrict__ xr = x + i * ldx;
        for (int64_t e = e0; e < e1; ++e) {
          const T c = dl[i * ldl + e];
          if (c == T(0)) continue;
          T* __restrict__ g = dWg + e * d;
          for (int64_t t = 0; t < d; ++t) g[t] += c * xr[t];
        }
      }
    }
  }
  return 1;
}

}  // namespace

extern "C" {

int moa_lora_vector_bytes() { return VBYTES; }

int64_t moa_lora_schedule(const int64_t* ids, int64_t n, int64_t k, int64_t E, int64_t* sched, int64_t* starts) {
  return build_schedule(ids, n, k, E, sched, starts);
}

#define MOA_FORWARD(NAME, T)                                                                                      \
  void NAME(const T* x, int64_t ldx, const T* A, const T* Bt, const int64_t* sched, const int64_t* starts,       \
            const T* w, const T* y0, int64_t ld0, const T* bias, T* y, int64_t ldy, T* h, int64_t n, int64_t k,  \
            int64_t E, int64_t r, int64_t d_in, int64_t d_out, int nthreads) {                                    \
    forward<T>(x, ldx, A, Bt, sched, starts, w, y0, ld0, bias, y, ldy, h, n, k, E, r, d_in, d_out, nthreads);     \
  }
MOA_FORWARD(moa_lora_forward_f32, float)
MOA_FORWARD(moa_lora_forward_f64, double)

#define MOA_BACKWARD(NAME, T)                                                                                     \
  void NAME(const T* dy, int64_t lddy, const T* x, int64_t ldx, const T* A, const T* Bt, const int64_t* sched,   \
            const int64_t* starts, const T* w, const T* h, T* dx, T* dA, T* dB, int64_t sE, int64_t sO,          \
            int64_t sQ, T* dw, T* dh, const T* dl, const T* Wg, T* dWg, int phase, int64_t n, int64_t k,          \
            int64_t E, int64_t r, int64_t d_in, int64_t d_out, int nthreads) {                                    \
    backward<T>(dy, lddy, x, ldx, A, Bt, sched, starts, w, h, dx, dA, dB, sE, sO, sQ, dw, dh, dl, Wg, dWg, phase, \
                n, k, E, r, d_in, d_out, nthreads);                                                               \
  }
MOA_BACKWARD(moa_lora_backward_f32, float)
MOA_BACKWARD(moa_lora_backward_f64, double)

#define MOA_TRANSPOSE(NAME, T)                                                                                    \
  void NAME(T* B, int64_t sE, int64_t sO, int64_t sQ, T* Bt, int64_t E, int64_t r, int64_t d_out, int to_bt,     \
            int nthreads) {                                                                                       \
    transpose_b<T>(B, sE, sO, sQ, Bt, E, r, d_out, to_bt != 0, nthreads);                                         \
  }
MOA_TRANSPOSE(moa_lora_transpose_f32, float)
MOA_TRANSPOSE(moa_lora_transpose_f64, double)

#define MOA_GATE(NAME, T)                                                                                         \
  int NAME(const T* dl, int64_t ldl, const T* x, int64_t ldx, const T* Wg, T* dx, int64_t lddx, T* dWg, int64_t n, \
           int64_t E, int64_t d, int nthreads) {                                                                  \
    return gate_backward_sparse<T>(dl, ldl, x, ldx, Wg, dx, lddx, dWg, n, E, d, nthreads);                       \
  }
MOA_GATE(moa_gate_backward_sparse_f32, float)
MOA_GATE(moa_gate_backward_sparse_f64, double)

}  // extern "C"
