"""What the CLI does with a parsed config before building it: one-line parse errors (:class:`MoAArgumentParser`)
and the task count of task-routed adapters taken from the data (:func:`link_task_count`)."""

from __future__ import annotations

import inspect
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser

from moa.experts.errors import UserError

# jsonargparse's explanation of a failed union (class_path or None), the value repeated: not what a user mends
_NOISE = ("Given value type:", "Given value:", "Subtypes:", "Errors:",
          "Does not validate against any of the Union subtypes", "Expected a <class 'NoneType'>")


def short_message(message: str) -> str:
    """A jsonargparse error on one line, without the union bookkeeping and the repeated value."""
    lines = (line.strip().removeprefix("- ") for line in message.splitlines())
    return " ".join(line for line in lines if line and not line.startswith(_NOISE))


class MoAArgumentParser(LightningArgumentParser):
    """A bad option or value (a typo in a config) is a :class:`UserError` naming it, which ``moa`` prints as one line
    (jsonargparse would print the whole usage first); parsers that jsonargparse tries and catches (one type of a
    union) fail as before."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        raise UserError(f"{short_message(message)}  ({parser.prog.replace(' [options]', '')} --help lists the options)"
                        ) from ex


def link_task_count(data: Any, model: Any) -> L.LightningDataModule | None:
    """A router that routes by task (``poly``, ``mhr``: option ``n_tasks``) takes its task count from the data
    module (``task_names`` or ``n_tasks``) when the config does not give it; a count given that differs is an
    error naming both. ``data`` / ``model``: the configs (``class_path`` + ``init_args``), edited in place. Returns
    the data module it built to count (None when it built none or it does not say), for the CLI to use."""
    from moa.routers import ROUTERS

    init = getattr(model, "init_args", None)
    router = ROUTERS.get(getattr(init, "router", None)) if init is not None else None
    options = dict((init.get("router_options") if init is not None else None) or {})
    by_task_experts = init is not None and init.get("router") == "static" and options.get("key") == "task_ids"
    if router is None or not (_takes_n_tasks(router) or by_task_experts) or data is None:
        return None
    datamodule = build_data(data)
    names = getattr(datamodule, "task_names", None)
    count = len(names) if names is not None else getattr(datamodule, "n_tasks", None)
    if not isinstance(count, int):
        return None  # the data does not say: the router asks for n_tasks itself
    if by_task_experts:  # one expert per task: found before the model's weights load
        experts = init.get("n_experts")
        if isinstance(experts, int) and experts < count:
            named = f" {list(names)}" if names is not None else ""
            raise UserError(f"router 'static' on task_ids: n_experts={experts} but the data has {count} tasks{named}; "
                            f"set model.init_args.n_experts to {count}")
        return datamodule
    given = options.get("n_tasks")
    if given is None:
        init["router_options"] = {**options, "n_tasks": count}
    elif given != count:
        named = f" {list(names)}" if names is not None else ""
        raise UserError(f"router {init.router!r}: router_options.n_tasks={given} but the data has {count} tasks"
                        f"{named}; drop n_tasks to take the data's count")
    return datamodule


def _takes_n_tasks(router: type) -> bool:
    """Whether a router class has the option ``n_tasks`` (in its own or an inherited ``__init__``)."""
    return any("n_tasks" in inspect.signature(cls.__init__).parameters for cls in router.__mro__ if "__init__" in vars(cls))


def build_data(data: Any) -> L.LightningDataModule:
    """The data module of a ``class_path`` + ``init_args`` config, built as the CLI builds it."""
    parser = LightningArgumentParser()
    parser.add_subclass_arguments(L.LightningDataModule, "data")
    config = {"class_path": data.class_path, "init_args": data.init_args.as_dict() if data.get("init_args") else {}}
    return parser.instantiate_classes(parser.parse_object({"data": config})).data
