"""``run`` / ``run_recbole``: RecBole's quick start, with plugin models, plugin yaml defaults, input
checks that fail before anything is written, and checkpoints that reload on torch >= 2.6."""

import os
import sys
import time
from logging import getLogger
from pathlib import Path

import torch
import torch.distributed as dist
from recbole.data import create_dataset, data_preparation
from recbole.utils import get_environment, init_logger, init_seed, set_color

from recbole_layersel.all_positions import windowed
from recbole_layersel.compat import atomic_files_verbatim, check_pins, compat_trainer
from recbole_layersel.distributed import is_main, launcher_settings
from recbole_layersel.errors import LayerSelError
from recbole_layersel.files import check_replaceable
from recbole_layersel.protocol import convergence
from recbole_layersel.registry import LayerSelConfig, get_trainer_class, read_header

TITLE_TYPES = ("token_seq", "token")  # atomic-file types a title column may have (titles.item_titles)


def check_dataset_files(data_path: str, dataset: str, title_field: str | None = None,
                        separator: str = "\t", encoding: str | None = None) -> None:
    """Fail with the fix when the atomic files are missing, or lack the title field a model needs."""
    folder = Path(data_path)
    inter_file = folder / f"{dataset}.inter"
    if not inter_file.is_file():
        raise LayerSelError(
            f"dataset {dataset!r} not found: no {inter_file}. Put RecBole atomic files "
            f"({dataset}.inter, {dataset}.item) in that folder, or point data_path at the folder "
            f"that holds {dataset}/, e.g. --data_path=/path/to/data (the repo's CI uses ../shared/data)."
        )
    if title_field is None:
        return
    item_file = folder / f"{dataset}.item"
    if not item_file.is_file():
        raise LayerSelError(
            f"dataset {dataset!r} has no item file {item_file}, but the model needs item titles "
            f"(title_field={title_field!r}). Provide {dataset}.item with a title column."
        )
    columns = read_header(item_file, separator, encoding)
    if title_field not in columns:
        raise LayerSelError(
            f"dataset {dataset!r}: title_field={title_field!r} is not a column of {item_file} "
            f"(columns: {', '.join(columns)}). Set title_field to the column that holds item titles."
        )
    if columns[title_field] not in TITLE_TYPES:
        raise LayerSelError(
            f"dataset {dataset!r}: title_field={title_field!r} is a {columns[title_field]} column of "
            f"{item_file}; a title is text: a token_seq (words) or token (one string) column."
        )


def check_config(config) -> None:
    """Input checks that need only the config; run before the logger writes anything."""
    if config["export_dir"] and not hasattr(config.model_class, "needs_titles"):
        raise LayerSelError(
            f"export_dir={config['export_dir']!r} is set, but {config['model']} has no compact export; "
            "only LayerSelLLM exports. Remove export_dir."
        )
    if config["export_dir"] and config["quantize"]:
        raise LayerSelError(
            f"export_dir={config['export_dir']!r} with quantize={config['quantize']!r}: int8 models cannot "
            "be exported (packed weights, not tensors). Remove one of the two."
        )
    if config["export_dir"]:  # before training, not after it
        from recbole_layersel.export import META_NAME  # imports the LLM stack: only runs that export

        check_replaceable(Path(config["export_dir"]).resolve(), META_NAME)
    needs_titles = getattr(config.model_class, "needs_titles", False)
    if needs_titles and config["title_field"] is None:
        raise LayerSelError(
            f"{config['model']} reads item titles, but title_field is not set. Set it to the item file's "
            "title column, e.g. --title_field=title, and load that column (load_col)."
        )
    title_field = config["title_field"] if needs_titles else None
    check_dataset_files(config["data_path"], config["dataset"], title_field, config["field_separator"],
                        config["encoding"])
    if title_field is not None:
        item_columns = (config["load_col"] or {}).get("item", [])
        if title_field not in item_columns:
            raise LayerSelError(
                f"title_field={title_field!r} is not loaded: load_col.item is {item_columns}. "
                f"Add it, e.g. load_col: {{item: [item_id, {title_field}]}}."
            )
        # The model resolves llm_path only after init_logger has created log/; check its form here.
        from recbole_layersel.llm import check_llm_path  # transformers: only for models that read titles

        check_llm_path(config["llm_path"])


def count_parameters(model: torch.nn.Module) -> int:
    """Every weight of ``model``: its ``nn.Parameter``s plus the int8 weights (and biases) of dynamically
    quantised Linear layers, which torch packs outside ``parameters()``."""
    count = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, torch.ao.nn.quantized.dynamic.Linear):
            count += module.weight().numel() + (module.bias().numel() if module.bias() is not None else 0)
    return count


def run_recbole(model=None, dataset=None, config_file_list=None, config_dict=None, saved=True, queue=None):
    """Train and test one model on one dataset, as ``recbole.quick_start.run_recbole`` does."""
    check_pins()
    config = LayerSelConfig(model, dataset, config_file_list, config_dict)
    check_config(config)
    init_seed(config["seed"], config["reproducibility"])
    # RecBole's init_logger checks, then creates ./log/<model>: under DDP two processes can race there.
    os.makedirs(os.path.join("log", config["model"]), exist_ok=True)
    init_logger(config)
    logger = getLogger()
    logger.info(sys.argv)
    logger.info(config)

    with atomic_files_verbatim():
        dataset = create_dataset(config)
    logger.info(dataset)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    if getattr(config.model_class, "trains_all_positions", False):
        train_data = windowed(train_data, config)

    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = config.model_class(config, train_data._dataset).to(config["device"])
    logger.info(model)
    if config["hooks_only"]:  # LayerSelLLM: choose layers (e.g. to reuse on another dataset), no training
        model.run_hooks(train_data, valid_data)
        result = {"selected_layers": model.selected_layers}
        _finish(config, queue, result)
        return result
    if hasattr(model, "before_training"):  # e.g. LayerSelLLM's frozen backbone states
        model.before_training(train_data, valid_data, test_data)

    trainer = compat_trainer(get_trainer_class(config))(config, model)
    start = time.perf_counter()
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=saved, show_progress=config["show_progress"]
    )
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    test_result = trainer.evaluate(test_data, load_best_model=saved, show_progress=config["show_progress"])
    test_seconds = time.perf_counter() - start
    if config["resume_file"] and is_main():  # the run is finished: nothing is left to resume
        Path(config["resume_file"]).unlink(missing_ok=True)
    users_per_second = inference_throughput(model, test_data)

    if config["export_dir"] and is_main():
        from recbole_layersel.export import export_compact

        logger.info(set_color("exported", "yellow") + f": {export_compact(model, config['export_dir'])}")
    logger.info("The running environment of this training is as follows:\n" + get_environment(config).draw())
    logger.info(set_color("best valid ", "yellow") + f": {best_valid_result}")
    logger.info(set_color("test result", "yellow") + f": {test_result}")
    result = {
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_valid_result,
        "test_result": test_result,
        "saved_model_file": trainer.saved_model_file if saved else None,
        # For leaderboards: how training ended, training time (fit, hooks excluded), the hooks' seconds per
        # stage, test time (checkpoint reload included), users scored in the test, inference throughput,
        # parameter counts and the layers kept.
        **convergence(trainer),
        "train_seconds": train_seconds,
        "hook_seconds": getattr(model, "hook_seconds", None),
        "test_seconds": test_seconds,
        "test_users": len(test_data._dataset),
        "inference_users_per_second": users_per_second,
        "selected_layers": getattr(model, "selected_layers", None),
        "parameters": count_parameters(model),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    _finish(config, queue, result)
    return result


def _finish(config, queue, result) -> None:
    if not config["single_spec"]:
        dist.destroy_process_group()
    if config["local_rank"] == 0 and queue is not None:
        queue.put(result)


@torch.no_grad()
def inference_throughput(model, test_data, max_users: int = 256) -> float:
    """Users per second of ``full_sort_predict`` over the test loader's first batches (at least
    ``max_users`` users), from scratch: states a model cached during training (LayerSelLLM's frozen
    backbone states) are dropped first, so the figure includes the backbone pass."""
    model.eval()
    if hasattr(model, "drop_cached_states"):
        model.drop_cached_states()
    users, start = 0, time.perf_counter()
    for interaction, *_ in test_data:
        model.full_sort_predict(interaction.to(model.device))
        users += len(interaction)
        if users >= max_users:
            break
    return users / (time.perf_counter() - start)


def _run_rank(rank, model, dataset, config_file_list, kwargs):
    kwargs["config_dict"]["local_rank"] = rank
    run_recbole(model, dataset, config_file_list, **kwargs)


def run(model, dataset, config_file_list=None, config_dict=None, saved=True, nproc=1,
        world_size=-1, ip="localhost", port="5678", group_offset=0):
    """One process; or this process as one of those that ``accelerate launch`` / ``torchrun`` started;
    or ``nproc`` processes started here (``mp.spawn``), as RecBole's own ``run`` does. The last two
    train with RecBole's DDP, and the pre-training hooks run data-parallel (``distributed.py``)."""
    launched = launcher_settings()
    if launched:
        if nproc != 1:
            raise LayerSelError(f"--nproc={nproc} inside a launcher that already started "
                                f"{launched['world_size']} processes; drop --nproc (the launcher's "
                                "--num_processes / --nproc_per_node sets the count).")
        return run_recbole(model, dataset, config_file_list, {**(config_dict or {}), **launched}, saved)
    if nproc == 1 and world_size <= 0:
        return run_recbole(model, dataset, config_file_list, config_dict, saved)
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    config_dict = dict(config_dict or {})
    config_dict.update({"world_size": world_size if world_size > 0 else nproc, "ip": ip,
                        "port": port, "nproc": nproc, "offset": group_offset})
    kwargs = {"config_dict": config_dict, "saved": saved, "queue": queue}
    mp.spawn(_run_rank, args=(model, dataset, config_file_list, kwargs), nprocs=nproc, join=True)
    return None if queue.empty() else queue.get()
