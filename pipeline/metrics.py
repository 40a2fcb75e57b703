"""TensorBoard metrics for the trainer (rank 0 only), model FLOPs utilisation and step timing.

Scalar and image tags are grouped: ``train/``, ``eval/``, ``perf/``, ``mem/``, ``data/``; any other prefix
is an error, so a typo cannot start a new group in the dashboard.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .distributed import DistInfo

logger = logging.getLogger(__name__)

GROUPS = ("train", "eval", "perf", "mem", "data")

# Dense (no sparsity) peak FLOP/s per device from the vendors' datasheets. Substrings of
# torch.cuda.get_device_name, most specific first. "tf32" is what float32 matmuls get when
# torch.get_float32_matmul_precision() is not "highest".
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", dict(bf16=756e12, fp16=756e12, tf32=378e12, fp32=51.2e12)),
    ("H100 NVL", dict(bf16=835e12, fp16=835e12, tf32=418e12, fp32=60e12)),
    ("H200 NVL", dict(bf16=835e12, fp16=835e12, tf32=418e12, fp32=60e12)),
    ("H100", dict(bf16=989e12, fp16=989e12, tf32=495e12, fp32=67e12)),  # SXM
    ("H200", dict(bf16=989e12, fp16=989e12, tf32=495e12, fp32=67e12)),  # SXM: H100 SXM compute
    ("A100", dict(bf16=312e12, fp16=312e12, tf32=156e12, fp32=19.5e12)),
    ("L40S", dict(bf16=362e12, fp16=362e12, tf32=183e12, fp32=91.6e12)),
    ("V100", dict(fp16=125e12, fp32=15.7e12)),  # no bf16 tensor cores
)
_DTYPE_KEYS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _check_tag(tag: str) -> None:
    if tag.split("/", 1)[0] not in GROUPS or "/" not in tag:
        raise ValueError(f"metric name {tag!r} must start with one of {', '.join(g + '/' for g in GROUPS)}")


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, str | float | bool]:
    """Nested dict -> {dotted.key: value} with values TensorBoard's hparams accept: bool, float
    (ints too) or str (None, lists, paths and anything else as their str)."""
    flat: dict[str, str | float | bool] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_config(value, name + "."))
        elif isinstance(value, bool | str):
            flat[name] = value
        elif isinstance(value, int | float):
            flat[name] = float(value)
        else:
            flat[name] = str(value)
    return flat


def _hparams_summaries(flat: dict[str, str | float | bool], metric_tags: list[str]) -> list:
    """The three summaries of TensorBoard's hparams plugin (experiment, session start, session end).
    Written here rather than by torch's ``hparams`` because that one stores bools as numbers."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    start = plugin_data_pb2.SessionStartInfo()
    infos = []
    for key, value in flat.items():
        if isinstance(value, bool):
            start.hparams[key].bool_value, kind = value, "DATA_TYPE_BOOL"
        elif isinstance(value, float):
            start.hparams[key].number_value, kind = value, "DATA_TYPE_FLOAT64"
        else:
            start.hparams[key].string_value, kind = value, "DATA_TYPE_STRING"
        infos.append(api_pb2.HParamInfo(name=key, type=api_pb2.DataType.Value(kind)))
    experiment = api_pb2.Experiment(
        hparam_infos=infos, metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=t)) for t in metric_tags]
    )
    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.Status.Value("STATUS_SUCCESS"))
    out = []
    for tag, field, message in (
        (metadata.EXPERIMENT_TAG, "experiment", experiment),
        (metadata.SESSION_START_INFO_TAG, "session_start_info", start),
        (metadata.SESSION_END_INFO_TAG, "session_end_info", end),
    ):
        content = plugin_data_pb2.HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION, **{field: message})
        plugin = SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=content.SerializeToString())
        out.append(Summary(value=[Summary.Value(tag=tag, metadata=SummaryMetadata(plugin_data=plugin))]))
    return out


class Metrics:
    """TensorBoard writer that exists on rank 0 only; elsewhere (or with ``enabled=False``) every
    method is a no-op and nothing is created on disk. Needs no process group."""

    def __init__(self, log_dir: Path, dist: DistInfo, enabled: bool = True):
        self.log_dir = Path(log_dir)
        self._writer = None
        if enabled and dist.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir))
            logger.info("TensorBoard logs in %s", self.log_dir)

    @property
    def active(self) -> bool:
        return self._writer is not None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """One point per tag at ``step``; tags like ``train/loss``, values anything ``float()`` takes."""
        if self._writer is None:
            return
        for tag in values:
            _check_tag(tag)
        for tag, value in values.items():
            self._writer.add_scalar(tag, float(value), step)

    def images(self, step: int, tag: str, images_uint8: torch.Tensor) -> None:
        """images_uint8 (B, 3, H, W) uint8 -> one grid image, ceil(sqrt(B)) per row, 2-pixel padding."""
        if self._writer is None:
            return
        _check_tag(tag)
        if images_uint8.ndim != 4 or images_uint8.shape[1] != 3 or images_uint8.dtype != torch.uint8:
            raise ValueError(f"images must be (B, 3, H, W) uint8, got {tuple(images_uint8.shape)} {images_uint8.dtype}")
        from torchvision.utils import make_grid

        nrow = math.ceil(math.sqrt(images_uint8.shape[0]))
        grid = make_grid(images_uint8.detach().cpu(), nrow=nrow, padding=2)  # (3, H', W') uint8
        self._writer.add_image(tag, grid, step, dataformats="CHW")

    def text(self, step: int, tag: str, text: str) -> None:
        """A line of text at ``step`` (TensorBoard's Text tab), e.g. how a run resumed."""
        if self._writer is None:
            return
        _check_tag(tag)
        self._writer.add_text(tag, text, step)

    def hparams(self, config_dict: dict, metrics: dict[str, float | None], step: int = 0) -> None:
        """Record the run's (nested) config as hparams under dotted keys, and declare ``metrics`` (grouped
        tags) as the ones the hparams dashboard shows. The dashboard reads each tag's latest scalar, so
        :meth:`scalars` under the same tags keeps it current; a value here is written as a scalar at
        ``step`` (pass None to declare a tag without plotting a placeholder point in its curve)."""
        if self._writer is None:
            return
        for tag in metrics:
            _check_tag(tag)
        file_writer = self._writer._get_file_writer()
        for summary in _hparams_summaries(flatten_config(config_dict), list(metrics)):
            file_writer.add_summary(summary, step)
        self.scalars(step, {k: v for k, v in metrics.items() if v is not None})

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def mfu(
    useful_flops_per_step: float, step_seconds: float, world_size: int, peak_flops_per_device: float | None
) -> float | None:
    """Model FLOPs utilisation: ``useful_flops_per_step`` (the whole global batch, no recomputation,
    e.g. ``dinat.flops.train_step_flops(...)["useful"]``) / (step_seconds * world_size * peak).
    None when the peak is unknown or no time was measured."""
    if peak_flops_per_device is None or peak_flops_per_device <= 0 or step_seconds <= 0:
        return None
    return useful_flops_per_step / (step_seconds * world_size * peak_flops_per_device)


@functools.cache
def _warn_unknown(name: str) -> None:
    logger.warning("no peak FLOP/s known for %r: MFU not reported (pass a peak override)", name)


def peak_flops(device: torch.device, dtype: torch.dtype, override: float | None = None) -> float | None:
    """Dense peak FLOP/s of one ``device`` for matmuls in ``dtype``, from :data:`PEAK_FLOPS`.

    ``override`` (e.g. from the run config) wins everywhere; it is the only way to get a figure on a CPU
    or an unlisted accelerator, which otherwise give None.
    """
    if override is not None:
        return float(override)
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    key = _DTYPE_KEYS.get(dtype)
    if key == "fp32" and torch.get_float32_matmul_precision() != "highest":
        key = "tf32"
    for pattern, table in PEAK_FLOPS:
        if pattern in name:
            return table.get(key) if key else None
    _warn_unknown(name)
    return None


class StepTimer:
    """Wall time per optimizer step and the share of it spent waiting for data.

    A step runs from the previous ``step_done()`` (or ``step_start()``) to the next ``step_done()``. Its data
    wait is the time from the step's start to ``data_ready()``; with gradient accumulation, call
    ``fetch_start()`` before each later micro-batch's fetch so that its wait (``fetch_start`` ->
    ``data_ready``) is added too -- a ``data_ready()`` with no fresh start mark adds nothing rather than
    count compute as waiting. Call ``step_start()`` after work between steps (eval, checkpoints) so that it
    is not counted. ``synchronize`` (e.g. ``torch.cuda.synchronize``) runs in ``step_done`` so that
    asynchronous device work lands in the step it belongs to.
    """

    def __init__(self, synchronize: Callable[[], None] | None = None, clock: Callable[[], float] = time.perf_counter):
        self._sync = synchronize
        self._clock = clock
        self.steps, self.total_seconds, self.data_seconds = 0, 0.0, 0.0
        self.step_start()

    def step_start(self) -> None:
        """(Re)starts the current step now; accumulated steps are kept."""
        self._step_start = self._clock()
        self._fetch_start: float | None = self._step_start
        self._step_data = 0.0
        self._fetched = False

    def fetch_start(self) -> None:
        self._fetch_start = self._clock()

    def data_ready(self) -> None:
        if self._fetch_start is not None:
            self._step_data += self._clock() - self._fetch_start
        self._fetch_start, self._fetched = None, True

    def step_done(self) -> float:
        """Ends a step; returns its wall time in seconds."""
        if not self._fetched:
            raise RuntimeError("StepTimer.step_done() called without data_ready() in this step")
        if self._sync is not None:
            self._sync()
        seconds = self._clock() - self._step_start
        self.steps += 1
        self.total_seconds += seconds
        self.data_seconds += self._step_data
        self.step_start()
        return seconds

    def pop(self) -> tuple[float, float]:
        """(total seconds, data-wait seconds) of the steps since the last pop/summary; resets them."""
        out = (self.total_seconds, self.data_seconds)
        self.steps, self.total_seconds, self.data_seconds = 0, 0.0, 0.0
        return out

    def summary(self) -> dict[str, float]:
        """{"steps", "step_seconds" (mean), "data_wait_fraction" (data wait / total)} since the last
        pop/summary; resets them."""
        steps = self.steps
        total, data = self.pop()
        return {
            "steps": float(steps),
            "step_seconds": total / steps if steps else 0.0,
            "data_wait_fraction": data / total if total > 0 else 0.0,
        }
