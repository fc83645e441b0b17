"""Per-sample transform pipelines from the config, for datasets read by DataLoader workers.

    "transforms": {"train": [{"type": "RandomCrop", "args": {"size": 32, "padding": 4}}, ...],
                   "eval": [{"type": "ToImage"}, ...]}

Each `type` is looked up in torchvision.transforms.v2 (or a dotted path) like every other `type` in a
config. Training batches go through "train", validation and the test split through "eval".

Random transforms draw from torch's generator, which the loader seeds per sample from (loader seed, epoch,
sample index) (base/base_data_loader.py): a sample is augmented the same way whichever worker or rank reads
it, and a resumed run (mid-epoch too) sees exactly the batches an uninterrupted one would."""

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset

from base import BaseDataLoader
from base.base_data_loader import SeededSamples
from config.resolve import check_built, resolve
from config.schema import check_args, check_keys
from utils.errors import SampleError, UserError

PIPELINES = ("train", "eval")


def _from_json(key: str, value: Any, where: str) -> Any:
    """The few transform arguments JSON cannot spell: `"dtype": "float32"`, `"interpolation": "bicubic"`."""
    if key == "dtype" and isinstance(value, str):
        dtype = getattr(torch, value.removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype):
            raise UserError(f"{where}.dtype: '{value}' is not a torch dtype (e.g. float32, uint8)")
        return dtype
    if key == "interpolation" and isinstance(value, str):
        from torchvision.transforms.v2 import InterpolationMode

        modes = [mode.value for mode in InterpolationMode]
        if value.lower() not in modes:
            raise UserError(f"{where}.interpolation: '{value}' is not one of {', '.join(modes)}")
        return InterpolationMode(value.lower())
    return value


def build_pipeline(specs: Any, where: str, restricted: bool = False) -> Callable:
    """A list of `{type, args}` as one torchvision.transforms.v2.Compose; a mistake is a UserError naming
    `where[i]` (unknown type with the closest match, unknown or bad argument)."""
    from torchvision.transforms import v2

    if not isinstance(specs, list):
        raise UserError(f"{where}: expected a list of {{type, args}} transforms, got {specs!r}")
    steps = []
    for i, spec in enumerate(specs):
        at = f"{where}[{i}]"
        if not isinstance(spec, dict):
            raise UserError(f"{at}: expected a mapping with 'type' and 'args', got {spec!r}")
        check_keys(spec, ["type", "args"], at)
        if not isinstance(spec.get("type"), str):
            raise UserError(f"{at}.type: missing or not a string")
        if not isinstance(spec.get("args", {}), dict):
            raise UserError(f"{at}.args: expected a mapping, got {spec['args']!r}")
        target = resolve("transform", spec["type"], f"{at}.type", restricted)
        args = {key: _from_json(key, value, f"{at}.args") for key, value in spec.get("args", {}).items()}
        check_args(target, args, f"{at}.args", set())
        try:
            steps.append(check_built("transform", target(**args), spec["type"], at))
        except (TypeError, ValueError) as e:
            raise UserError(f"{at}: {spec['type']}: {e}") from None
    return v2.Compose(steps)


def check_transforms(transforms: Any, where: str, restricted: bool = False) -> dict[str, Callable]:
    """`{"train": [...], "eval": [...]}` (either may be left out) as {name: pipeline}."""
    if transforms is None:
        return {}
    if not isinstance(transforms, dict):
        raise UserError(f"{where}: expected a mapping with 'train' and/or 'eval', got {transforms!r}")
    check_keys(transforms, PIPELINES, where)
    return {name: build_pipeline(specs, f"{where}.{name}", restricted) for name, specs in transforms.items()}


class Transformed(Dataset):
    """`dataset`'s (input, target) samples with `transform` applied to the input."""

    def __init__(self, dataset: Dataset, transform: Callable):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:
        if name in ("classes", "targets", "samples", "root"):  # for the loader's class names and data fingerprint
            return getattr(self.dataset, name)
        raise AttributeError(name)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        data, target = self.dataset[index]
        return self.transform(data), target


class PipelineDataLoader(BaseDataLoader):
    """A dataset of (input, target) samples, transformed with the config's "train" pipeline for training
    and its "eval" pipeline for validation and the test split (`default` where the config gives none).
    Those in use are tried on sample 0 at start-up: one that fails, or gives no tensor, stops the run there."""

    def __init__(self, dataset: Dataset, transforms: dict | None, default: list[dict], *, training: bool,
                 seed: int, **options):
        pipelines = {name: build_pipeline(default, f"default {name} transforms") for name in PIPELINES}
        self.pipelines = {**pipelines, **check_transforms(transforms, "transforms")}
        first_name = "train" if training else "eval"
        super().__init__(Transformed(dataset, self.pipelines[first_name]), seed=seed, **options)
        tried = ["train", "eval"] if training and self.valid_indices is not None else [first_name]
        for name in tried if len(dataset) else []:
            self._try(SeededSamples(Transformed(dataset, self.pipelines[name]), seed), name)

    @classmethod
    def check_config(cls, args: dict, where: str, restricted: bool) -> None:
        """Called by the config check, before anything is built: the transforms' names and arguments."""
        check_transforms(args.get("transforms"), f"{where}.transforms", restricted)

    @staticmethod
    def _try(dataset: SeededSamples, name: str) -> None:
        try:
            data = dataset.__getitems__([(0, 0)])[0][0]
        except SampleError as e:
            cause = e.__cause__  # what the dataset raised: a transform's error is told as one
            if not isinstance(cause, (TypeError, ValueError, RuntimeError, IndexError)):
                raise
            message = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
            raise UserError(f"transforms.{name}: fails on sample 0: {message}") from None
        if not isinstance(data, torch.Tensor):
            raise UserError(f"transforms.{name}: gives {type(data).__name__} for sample 0, not a tensor: end it with "
                            '{"type": "ToImage"}, {"type": "ToDtype", "args": {"dtype": "float32", "scale": true}}')

    def split_validation(self) -> BaseDataLoader | None:
        """The held-out samples, through the "eval" pipeline."""
        valid = super().split_validation()
        if valid is not None:
            valid.dataset = Transformed(self.dataset.dataset, self.pipelines["eval"])
        return valid
