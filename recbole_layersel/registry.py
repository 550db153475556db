"""RecBole glue: resolve a model name (plugin models first, then RecBole's own) and build a RecBole
``Config`` that also reads the plugin's yaml defaults.

Config priority, lowest first. It is RecBole's own order, with the two plugin layers slotted in right
after RecBole's internal defaults::

    RecBole's overall / model / dataset / quick-start yamls
    < properties/<Model>.yaml            (plugin model defaults)
    < dataset_configs/<dataset>.yaml     (loaded automatically when present)
    < config files < config_dict < command line  (RecBole's usual order)

A dataset without a yaml, run without ``load_col``, gets the shipped yamls' protocol and the columns its
atomic files' headers name (``LayerSelConfig._derive_dataset_config``).
"""

import difflib
import importlib
import re
from logging import getLogger
from pathlib import Path

import recbole.model
import torch
import torch.distributed as dist
from recbole.config import Config
from recbole.utils import get_model as recbole_get_model
from recbole.utils import get_trainer as recbole_get_trainer

from recbole_layersel.errors import LayerSelError

REPO_ROOT = Path(__file__).resolve().parents[1]
PROPERTIES_DIR = REPO_ROOT / "properties"
DATASET_CONFIGS_DIR = REPO_ROOT / "dataset_configs"
DATASET_TEMPLATE = "TEMPLATE.yaml.example"  # in DATASET_CONFIGS_DIR; not <dataset>.yaml, so never loaded

# The protocol every shipped dataset_configs/*.yaml sets: time-ordered leave-one-out, full ranking without
# the user's earlier items, training until early stopping. A dataset without a yaml gets it too.
SEQUENTIAL_PROTOCOL = {
    "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
    "metrics": ["NDCG", "MRR", "Precision", "Recall", "Hit"],
    "topk": [5, 10],
    "valid_metric": "NDCG@10",
    "eval_mask_history": True,
    "stopping_step": 10,
    "epochs": 300,
}

# Plugin model name -> "module:class". Imported lazily, so that running a RecBole baseline never
# imports transformers.
PLUGIN_MODELS: dict[str, str] = {"LayerSelLLM": "recbole_layersel.model:LayerSelLLM",
                                  "SASRecAllPositions": "recbole_layersel.all_positions:SASRecAllPositions",
                                  "Pop": "recbole_layersel.pop:Pop"}  # RecBole's Pop miscounts (pop.py)
RECBOLE_MODEL_PROPERTIES = Path(recbole.model.__file__).parents[1] / "properties" / "model"

_RECBOLE_MODEL_PACKAGES = (
    "general_recommender",
    "context_aware_recommender",
    "sequential_recommender",
    "knowledge_aware_recommender",
    "exlib_recommender",
)


def recbole_model_names() -> list[str]:
    """RecBole's own model class names, read from its source files (importing them all is slow)."""
    names = []
    root = Path(recbole.model.__file__).parent
    for package in _RECBOLE_MODEL_PACKAGES:
        for file in sorted((root / package).glob("*.py")):
            for name in re.findall(r"^class (\w+)\(", file.read_text(encoding="utf-8"), re.M):
                if name.lower() == file.stem:
                    names.append(name)
    return names


def get_model_class(name: str) -> type:
    """The model class for ``name``: a plugin model if one has that name, else RecBole's own."""
    if name in PLUGIN_MODELS:
        module, attr = PLUGIN_MODELS[name].split(":")
        return getattr(importlib.import_module(module), attr)
    try:
        return recbole_get_model(name)
    except (ValueError, AttributeError):
        raise LayerSelError(
            f"unknown model {name!r}. Plugin models: {', '.join(PLUGIN_MODELS) or '(none)'}. "
            f"RecBole models: {', '.join(recbole_model_names())}. Names are case-sensitive, "
            "e.g. --model=SASRec."
        ) from None


def get_trainer_class(config: Config) -> type:
    """The trainer a model asks for (a plugin model may name its own), else RecBole's choice."""
    model_class = get_model_class(config["model"])
    return getattr(model_class, "trainer_class", None) or recbole_get_trainer(
        config["MODEL_TYPE"], config["model"]
    )


# Settings that no yaml defines: RecBole's launcher arguments and the run-level ones of this package.
RUN_SETTINGS = {"model", "dataset", "config_files", "nproc", "ip", "port", "world_size", "offset",
                "group_offset", "local_rank", "launcher", "resume_file", "export_dir"}
# Dataset settings that no default defines: RecBole's file encoding, and this package's title column.
DATASET_SETTINGS = {"encoding", "title_field"}


def read_header(file: Path, separator: str, encoding: str | None = None) -> dict[str, str]:
    """An atomic file's columns, name -> type (``user_id:token`` -> ``{'user_id': 'token'}``), read as
    RecBole reads it (``field_separator``, ``encoding``)."""
    with open(file, encoding=encoding or "utf-8") as handle:
        header = handle.readline().rstrip("\r\n")
    if header.startswith("\ufeff"):
        raise LayerSelError(
            f"{file} starts with a byte-order mark, which would become part of its first column's name. "
            "Save it as UTF-8 without one, or set encoding: utf-8-sig."
        )
    return dict(column.partition(":")[::2] for column in header.split(separator))


class LayerSelConfig(Config):
    """RecBole's ``Config`` that knows the plugin's models and reads the plugin's yaml defaults."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._warn_unknown_settings()

    def _warn_unknown_settings(self):
        """RecBole keeps any key it is given; one that no default defines is most likely a typo."""
        known = set(self.internal_config_dict) | RUN_SETTINGS | DATASET_SETTINGS
        for key in sorted(set(self.external_config_dict) - known):
            close = difflib.get_close_matches(key, known, n=1)
            getLogger(__name__).warning(
                f"{key}={self.external_config_dict[key]!r} is not a setting of {self.model} or RecBole, so "
                f"nothing reads it{f'; did you mean {close[0]}?' if close else '.'}")

    def _get_model_and_dataset(self, model, dataset):
        if model is None:
            model = self.external_config_dict.get("model")
        if model is None:
            raise LayerSelError("no model given: pass --model=NAME (e.g. --model=SASRec).")
        if isinstance(model, str):
            model = get_model_class(model)
        return super()._get_model_and_dataset(model, dataset)

    def _load_internal_config_dict(self, model, model_class, dataset):
        super()._load_internal_config_dict(model, model_class, dataset)
        # One evaluation protocol for every model (protocol.py), whatever the dataset's yaml says.
        self.internal_config_dict["eval_mask_history"] = True
        for parent in reversed(model_class.__mro__[1:]):  # a plugin subclass of a RecBole model: its yaml
            parent_file = RECBOLE_MODEL_PROPERTIES / f"{parent.__name__}.yaml"
            if parent_file.is_file():
                self._update_internal_config_dict(parent_file)
        model_file = PROPERTIES_DIR / f"{model}.yaml"
        if model_file.is_file():
            self._update_internal_config_dict(model_file)
        dataset_file = DATASET_CONFIGS_DIR / f"{dataset}.yaml"
        if dataset_file.is_file():
            self._add_dataset_keys(self._update_internal_config_dict(dataset_file) or {})
        elif "load_col" not in self.external_config_dict:
            self._derive_dataset_config(model_class, dataset)

    def _add_dataset_keys(self, keys):
        # As RecBole does for its own dataset yamls: these keys describe the dataset.
        self.parameters["Dataset"] += [key for key in keys if key not in self.parameters["Dataset"]]

    def _setting(self, key):
        """``key`` as it stands before the final merge: the user's value, else the internal default."""
        return self.external_config_dict.get(key, self.internal_config_dict.get(key))

    def _derive_dataset_config(self, model_class, dataset):
        """What a dataset yaml would say, read from the atomic files' headers. RecBole's own default
        ``load_col`` loads neither the time field the sequential protocol orders by nor item titles."""
        folder = Path(self._setting("data_path")) / dataset
        inter_file, item_file = folder / f"{dataset}.inter", folder / f"{dataset}.item"
        if not inter_file.is_file():
            return  # nothing to read; quick_start.check_dataset_files names the missing file
        inter_fields = {key: self._setting(key) for key in ("USER_ID_FIELD", "ITEM_ID_FIELD", "TIME_FIELD")}
        columns = self._check_fields(inter_file, inter_fields, dataset)
        self._check_time_type(inter_file, inter_fields["TIME_FIELD"], columns, dataset)
        derived = {"load_col": {"inter": list(inter_fields.values())}, **SEQUENTIAL_PROTOCOL}
        title_field = self._title_field(item_file, dataset, getattr(model_class, "needs_titles", False))
        if item_file.is_file():  # every model drops the interactions whose item has no row there alike
            derived["load_col"]["item"] = [self._setting("ITEM_ID_FIELD")]
        if title_field is not None:
            derived["load_col"]["item"].append(title_field)
            derived["title_field"] = title_field
        self.internal_config_dict.update(derived)
        self._add_dataset_keys(["load_col", "title_field"])
        protocol = {key: self._setting(key) for key in SEQUENTIAL_PROTOCOL}  # what applies, the user's first
        getLogger(__name__).warning(
            f"no {DATASET_CONFIGS_DIR / dataset}.yaml, so settings were derived from the headers in "
            f"{folder}: load_col={derived['load_col']}, title_field={title_field}, and the sequential "
            f"protocol {protocol}. To change them, {self._yaml_advice(dataset)}."
        )

    def _title_field(self, item_file, dataset, needs_titles):
        """The item file's title column: ``title_field`` if set, else its column named ``title``, else its
        only ``token_seq`` column; None when there is none and the model reads no titles."""
        if not item_file.is_file():
            if needs_titles:
                raise LayerSelError(
                    f"dataset {dataset!r} has no item file {item_file}, but the model needs item titles. "
                    f"Provide {item_file.name} with a title column."
                )
            return None
        title_field = self._setting("title_field")
        if title_field is None:
            columns = self._read_header(item_file)
            token_seqs = [name for name, kind in columns.items() if kind == "token_seq"]
            if "title" in columns:
                title_field = "title"
            elif len(token_seqs) == 1:
                title_field = token_seqs[0]
            elif not needs_titles:
                return None
            else:
                raise LayerSelError(
                    f"which column of {item_file} holds the item titles? It has no column named title and "
                    f"{len(token_seqs)} token_seq columns (columns: "
                    f"{', '.join(f'{n}:{k}' for n, k in columns.items())}). Name it with "
                    f"--title_field=COLUMN, or set load_col yourself: {self._yaml_advice(dataset)}."
                )
        item_fields = {"ITEM_ID_FIELD": self._setting("ITEM_ID_FIELD"), "title_field": title_field}
        self._check_fields(item_file, item_fields, dataset)
        return title_field

    def _check_time_type(self, inter_file, time_field, columns, dataset):
        """RecBole orders a user's items by the time field's values; a token column's values are ids in
        the order the file first shows them, not times."""
        kind = columns[time_field]
        if kind != "float":
            raise LayerSelError(
                f"{inter_file}: TIME_FIELD {time_field!r} is a {kind} column, so RecBole would order each "
                f"user's items by the order its values first appear in the file, not by time. Write it as "
                f"{time_field}:float (e.g. Unix seconds), or name another column: "
                f"{self._yaml_advice(dataset)}."
            )

    def _check_fields(self, file, fields, dataset):
        """One error naming every field of ``fields`` (setting -> column name) that ``file`` lacks; else
        the file's columns (``_read_header``)."""
        columns = self._read_header(file)
        missing = [f"{key}={name!r}" for key, name in fields.items() if name not in columns]
        if missing:
            raise LayerSelError(
                f"{file} has no column for {', '.join(missing)} (columns: {', '.join(columns)}). Dataset "
                f"{dataset!r} has no yaml, so its columns are read from its file headers, and the "
                "sequential protocol orders each user's items by time. Name your columns (USER_ID_FIELD, "
                f"ITEM_ID_FIELD, TIME_FIELD, load_col): {self._yaml_advice(dataset)}."
            )
        return columns

    def _read_header(self, file):
        return read_header(file, self._setting("field_separator"), self._setting("encoding"))

    @staticmethod
    def _yaml_advice(dataset):
        return (
            f"copy {DATASET_CONFIGS_DIR / DATASET_TEMPLATE} to {DATASET_CONFIGS_DIR / dataset}.yaml "
            "(or to a file you pass with --config_files) and fill it in"
        )

    def _set_default_parameters(self):
        # RecBole 1.2.1 rejects loss_type CE next to its own default negative sampling
        # (overall.yaml), so every CE model (SASRec, GRU4Rec, ...) would need
        # `train_neg_sample_args: ~` spelled out. Imply it unless the user set it.
        if (
            self.final_config_dict.get("loss_type") == "CE"
            and "train_neg_sample_args" not in self.external_config_dict
        ):
            self.final_config_dict["train_neg_sample_args"] = None
        super()._set_default_parameters()

    def _init_device(self):
        """RecBole's device set-up, plus the two ways into its DDP that RecBole 1.2.1 lacks: processes
        without a GPU (a gloo group on the CPU; RecBole's set-up is NCCL and ``cuda:rank`` only) and
        processes started by ``accelerate launch`` or ``torchrun`` (their env:// rendezvous, every GPU
        visible, ``cuda:LOCAL_RANK``). See ``distributed.launcher_settings``."""
        config = self.final_config_dict
        launched = config.get("launcher") == "env"
        # RecBole itself reads only gpu_id (empty = CPU); use_gpu=False is the usual way to say CPU too.
        use_cuda = torch.cuda.is_available() and config["use_gpu"] and str(config["gpu_id"]) != ""
        if "local_rank" in config and use_cuda:
            visible = len(str(config["gpu_id"]).split(",")) if not launched else torch.cuda.device_count()
            if config["nproc"] > visible:
                raise LayerSelError(
                    f"{config['nproc']} processes on this machine but {visible} GPU(s) for them "
                    f"(gpu_id={config['gpu_id']!r}, {torch.cuda.device_count()} visible); start at most "
                    f"{visible} processes, list more GPUs in --gpu_id, or run on CPUs with --use_gpu=False."
                )
        if "local_rank" not in config or (use_cuda and not launched):
            super()._init_device()
            return
        gpu_id = config["gpu_id"]
        config["gpu_id"] = ",".join(map(str, gpu_id)) if isinstance(gpu_id, tuple) else str(gpu_id)
        local_rank = config["local_rank"]
        init_method = "env://" if launched else f"tcp://{config['ip']}:{config['port']}"
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method=init_method,
                                    rank=local_rank + config["offset"], world_size=config["world_size"])
        if use_cuda:
            torch.cuda.set_device(local_rank)
        config["device"] = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        config["single_spec"] = False
        if local_rank != 0:  # as RecBole: only the first process logs
            config.update(state="error", show_progress=False, verbose=False)
