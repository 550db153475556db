"""Running RecBole 1.2.1 on today's stack: the pins we chose, and the few shims we need.

RecBole 1.2.1 (2023) predates numpy 2, pandas 3 and torch >= 2.6. Each break, and our answer:

==================================================  ==================================  =====================
break                                               where RecBole hits it               answer
==================================================  ==================================  =====================
numpy 2 removed ``np.float_``, ``np.complex_``,     ``Config.compatibility_settings``   pin ``numpy<2``
``np.unicode_``, ``np.bool8``
pandas 3 (copy-on-write) makes                      ``Dataset._fill_nan``,              pin ``pandas<3``
``df[col].fillna(inplace=True)`` a silent no-op     token-sequence splitting
and changes ``Series.agg(len)``
ray 2.6.3 (RecBole's pin) imports ``pkg_resources``  ``recbole.quick_start`` imports     pin ``setuptools<81``
which setuptools 81 removed                         ``ray.tune``
scipy 1.13 removed ``dok_matrix._update``, which    the graph builders of LightGCN,     pin ``scipy<1.13``
RecBole's graph models fill their adjacency with    NGCF, SpectralCF, GCMC, NCL, KGIN
                                                    and MCCLK
torch >= 2.6 loads with ``weights_only=True`` and   ``Trainer.evaluate(                 ``TrustedCheckpoint
refuses RecBole's checkpoints (they pickle the      load_best_model=True)``             Mixin`` below
``Config``)
pandas' CSV reader takes a field that starts with   ``Dataset._load_feat`` reads atomic  ``atomic_files_
``"`` as quoted, so the title ``"C" Size Battery``  files with ``pd.read_csv``          verbatim`` below
is mangled or the whole file is rejected
RecBole's DDP is CUDA-only: NCCL, ``cuda:rank``,    ``Config._init_device``,            ``LayerSelConfig``
and ``DistributedDataParallel(device_ids=[rank])``  ``AbstractTrainer.__init__``        (registry.py),
which torch refuses for a CPU module                                                    ``DDPMixin`` below
RecBole's ``sine.py`` switches torch's autograd     importing any RecBole sequential    switched off below
anomaly mode on for the whole process when          model (SASRec included) imports
imported                                            it
==================================================  ==================================  =====================

Pins rather than shims where a pin works: a pin runs RecBole's code as its authors tested it, while
patching numpy or pandas would change them for every other library in the process. The checkpoint
shim does not switch ``weights_only`` off: it unpickles only a file whose bytes this run wrote, and
anything else still goes through torch's safe loader. The atomic-file shim changes only the ``pd`` that
RecBole's dataset module sees, only its ``read_csv``, and only during our own ``create_dataset`` calls:
atomic files are plain tab-separated text with no quoting convention, read verbatim, and a field that
looks CSV-quoted (``"5"``) is kept as it is and reported with a warning. The device set-up takes over
only where RecBole's would fail (no GPU, or a launcher's rendezvous); the trainer's DDP wrapper is
RecBole's, built with CPU-valid arguments, its buffers sent once instead of every step, and one
checkpoint name for all processes. Tests: ``tests/test_compat.py``, one per row, and
``tests/test_distributed.py``.
"""

import csv
import hashlib
import io
import logging
import os
import pickle
import warnings
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import numpy
import pandas
import recbole.data.dataset.dataset
import recbole.model.sequential_recommender  # noqa: F401 (imports sine.py: see below)
import scipy
import torch
from recbole.trainer import Trainer
from recbole.utils import set_color
from torch.nn.parallel import DistributedDataParallel

from recbole_layersel.errors import LayerSelError
from recbole_layersel.files import replaced_on_success, sha256_file
from recbole_layersel.protocol import HistoryMaskMixin, ResumeMixin

logger = logging.getLogger(__name__)

# RecBole's sine.py calls torch.autograd.set_detect_anomaly(True) at import, and its model package imports it
# with every sequential model. Anomaly mode, a debugging aid, then records a stack trace for every autograd op
# of every model in the process and checks every backward for NaNs: the importance pass on ml-100k took 60 s
# instead of 41 s. It changes no result. sine.py is imported above, so this comes after it.
torch.autograd.set_detect_anomaly(False)

# name -> (installed version, first major.minor RecBole 1.2.1 breaks on)
PINS = {"numpy": (numpy.__version__, "2"), "pandas": (pandas.__version__, "3"),
        "scipy": (scipy.__version__, "1.13")}


class AtomicFilePandas:
    """pandas as RecBole's dataset module sees it inside ``atomic_files_verbatim``: ``read_csv`` of a
    tab-separated file does no quote processing, and reports the fields a CSV writer may have quoted. A
    file with another separator is CSV, where quotes are how a field holds that separator: read as
    pandas reads it."""

    def __getattr__(self, name):
        return getattr(pandas, name)

    @staticmethod
    def read_csv(filepath, *args, **kwargs):
        if kwargs.get("delimiter", kwargs.get("sep")) != "\t":
            return pandas.read_csv(filepath, *args, **kwargs)
        frame = pandas.read_csv(filepath, *args, quoting=csv.QUOTE_NONE, **kwargs)
        warn_quoted_fields(filepath, frame)
        return frame


def warn_quoted_fields(filepath, frame: pandas.DataFrame) -> None:
    """One warning for the file when string fields start and end with ``"``: read verbatim, ``"5"``
    is another token than ``5``, which a file that went through a CSV writer may not mean."""
    text = frame.select_dtypes(include="object")
    quoted = text.apply(lambda column: column.str.len().ge(2) & column.str.startswith('"', na=False)
                        & column.str.endswith('"', na=False))
    rows, columns = numpy.nonzero(quoted.to_numpy())
    if len(rows) == 0:
        return
    logger.warning(
        f"{filepath}: {len(rows)} field(s) are wrapped in double quotes, e.g. "
        f"{text.columns[columns[0]]} = {text.iat[rows[0], columns[0]]}. RecBole atomic files are "
        "tab-separated and unquoted, so the quotes are kept as part of the value. If a CSV writer added "
        "them, write the file again without quoting (csv.QUOTE_NONE)."
    )


@contextmanager
def atomic_files_verbatim():
    """RecBole atomic files are tab-separated and unquoted: every field is read verbatim, a leading or
    trailing ``"`` included. Inside this block RecBole's dataset module reads them so
    (``AtomicFilePandas``); on the way out, error or not, it gets its own ``pd`` back, so models and
    libraries outside our dataset loads see pandas unchanged."""
    module = recbole.data.dataset.dataset
    recbole_pd = module.pd
    module.pd = AtomicFilePandas()
    try:
        yield
    finally:
        module.pd = recbole_pd


def _major_minor(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:2])


def check_pins() -> None:
    """Fail early, with the fix, when the environment has a numpy, pandas or scipy RecBole cannot run on."""
    for name, (version, first_bad) in PINS.items():
        if _major_minor(version) >= _major_minor(first_bad):
            raise LayerSelError(
                f"{name} {version} is installed, but RecBole 1.2.1 breaks on {name} >= "
                f"{first_bad} (see recbole_layersel/compat.py). Fix: "
                f'pip install "{name}<{first_bad}"'
            )


def load_checkpoint(path: str, trusted_sha256: dict[str, set[str]], device) -> dict:
    """Load a RecBole checkpoint: unpickled only if this run wrote exactly these bytes (``trusted_sha256``:
    path -> the sha256 of every version a process of this run wrote there)."""
    path = os.path.abspath(path)
    # One read: the bytes unpickled are the bytes hashed, even if the file is replaced in between.
    with open(path, "rb") as file:
        data = file.read()
    if path in trusted_sha256 and hashlib.sha256(data).hexdigest() in trusted_sha256[path]:
        return torch.load(io.BytesIO(data), map_location=device, weights_only=False)
    try:
        return torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        raise LayerSelError(
            f"refusing to unpickle checkpoint {path}: this run did not write it (or it changed "
            "since), and it holds more than tensors, so loading it could run arbitrary code. "
            "Fix: retrain, or, for a file you trust, load it yourself with "
            f"torch.load(path, weights_only=False). Torch said: {str(error).splitlines()[0]}"
        ) from None


class TrustedCheckpointMixin:
    """Writes checkpoints atomically and remembers their sha256, so that RecBole's
    ``evaluate(load_best_model=True)`` can reload the best one on torch >= 2.6."""

    def __init__(self, config, model):
        super().__init__(config, model)
        self.written_checkpoints: dict[str, set[str]] = {}

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        path = os.path.abspath(kwargs.pop("saved_model_file", self.saved_model_file))
        # Under DDP RecBole writes on local rank 0 only; every process saves at the same epochs.
        writer = self.config["single_spec"] or self.config["local_rank"] == 0
        written = None
        if writer:
            with replaced_on_success(Path(path)) as partial:
                super()._save_checkpoint(epoch, verbose=False, saved_model_file=str(partial), **kwargs)
            written = sha256_file(path)
            if hasattr(self.model, "export_beside_checkpoint"):  # a pickle-free copy others can load
                self.model.export_beside_checkpoint(path)
            if verbose:
                self.logger.info(set_color("Saving current", "blue") + f": {path}")
        hashes = [written]
        if not self.config["single_spec"]:  # the other processes reload what the writers wrote
            hashes = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(hashes, written)
        self.written_checkpoints.setdefault(path, set()).update(h for h in hashes if h is not None)

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if eval_data and load_best_model:
            checkpoint_file = model_file or self.saved_model_file
            checkpoint = load_checkpoint(checkpoint_file, self.written_checkpoints, self.device)
            self.model.load_state_dict(checkpoint["state_dict"])
            self.model.load_other_parameter(checkpoint.get("other_parameter"))
            self.logger.info(f"Loading model structure and parameters from {checkpoint_file}")
        return super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)


class DDPMixin:
    """RecBole's trainer under DDP, on CPU processes too: RecBole wraps the model with
    ``device_ids=[rank]`` (CUDA only), re-sends its buffers every step, and names the checkpoint after
    each process's own clock, after a checkpoint folder check that two processes can race. Here every
    process uses rank 0's checkpoint name, the folder exists first, and the fixed title embeddings (the
    model's buffers) are sent once, when the wrapper is built."""

    def __init__(self, config, model):
        if config["single_spec"]:
            super().__init__(config, model)
            return
        # RecBole's ensure_dir checks, then creates: two processes can both find it missing.
        os.makedirs(config["checkpoint_dir"], exist_ok=True)
        config["single_spec"] = True  # RecBole's own wrapper would be built here; ours is below
        try:
            super().__init__(config, model)
        finally:
            config["single_spec"] = False
        if config["device"].type == "cuda":  # as RecBole does on GPUs
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        device_ids = [config["local_rank"]] if config["device"].type == "cuda" else None
        with warnings.catch_warnings():  # torch >= 2.13 renames broadcast_buffers; it still works
            warnings.simplefilter("ignore", FutureWarning)
            self.distributed_model = DistributedDataParallel(self.model, device_ids=device_ids,
                                                             broadcast_buffers=False)
        name = [self.saved_model_file]
        torch.distributed.broadcast_object_list(name, src=0)
        self.saved_model_file = name[0]


@cache
def compat_trainer(trainer_class: type) -> type:
    """``trainer_class`` with ``TrustedCheckpointMixin``, ``DDPMixin`` and the protocol of every run
    (``protocol.HistoryMaskMixin``, ``protocol.ResumeMixin``); RecBole trainers outside the ``Trainer``
    family (decision trees) save differently and are returned unchanged."""
    if not issubclass(trainer_class, Trainer):
        return trainer_class
    mixins = (TrustedCheckpointMixin, DDPMixin, HistoryMaskMixin, ResumeMixin)
    return type(trainer_class.__name__, (*mixins, trainer_class), {})
