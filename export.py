"""Export a checkpoint's model to a file that runs without this project: ONNX, TorchScript or torch.export.

    python export.py -r saved/mnist/<run_id>/model_best.pth --format onnx       # model_best.onnx
    python export.py -r saved/mnist/<run_id>/model_best.pth --format exported   # model_best.pt2

The input shape is that of a batch of the data loader's test split (the batch size stays free). The file is
written to a temporary name, loaded back and run on that batch and on its first sample; it replaces -o only
when its outputs match the model's within 1e-4. ONNX needs requirements-export.txt."""

import utils.python_version  # noqa: F401 - first: an older Python stops here, in one line

# isort: split
import os
import warnings
from pathlib import Path

import torch

from predict import load_model
from runs.run import CHECKPOINT_HELP, check_output_path
from trainer.trainer import data_and_target
from utils.checkpoint import TMP_MARK
from utils.cli import ArgumentParser, add_common_arguments, run_main, text
from utils.errors import TrainingError, UserError

TOLERANCE = 1e-4  # the largest absolute difference from the PyTorch model's outputs


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-r", "--resume", type=text, required=True, help=CHECKPOINT_HELP)
    parser.add_argument("--format", required=True, choices=list(FORMATS), help="the kind of file to write")
    parser.add_argument("-o", "--output", type=text,
                        help="file to write (default: the checkpoint's, with the format's suffix, replaced)")
    parser.add_argument("--force", action="store_true", help="let -o replace an existing file")
    add_common_arguments(parser)
    parser.set_defaults(device="cpu")  # a CPU trace runs anywhere; -d cuda for a CUDA program
    return parser.parse_args(argv)


def write_onnx(model: torch.nn.Module, sample: torch.Tensor, path: Path):
    """torch.onnx's exporter (torch.export based); the file is run back with onnxruntime on the CPU."""
    try:
        import onnxruntime
        import onnxscript  # noqa: F401 - the exporter's dependency: fail here, with the fix, not deep inside it
    except ImportError as e:
        raise UserError(f"--format onnx needs {e.name}: pip install -r requirements-export.txt") from None
    torch.onnx.export(model, (sample,), str(path), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},),
                      external_data=False, verbose=False)  # one file, weights inside
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.cpu().numpy()})[0])


def write_torchscript(model: torch.nn.Module, sample: torch.Tensor, path: Path):
    with warnings.catch_warnings():  # torch.jit is deprecated in favour of torch.export, still widely deployed
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, sample), str(path))
        return torch.jit.load(str(path), map_location=sample.device)


def write_exported(model: torch.nn.Module, sample: torch.Tensor, path: Path):
    program = torch.export.export(model, (sample,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    torch.export.save(program, str(path))
    return torch.export.load(str(path)).module()


# format -> (file suffix, writer: (model, sample batch, path) -> the written file, loaded back as a callable)
FORMATS = {"onnx": (".onnx", write_onnx), "torchscript": (".torchscript.pt", write_torchscript),
           "exported": (".pt2", write_exported)}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.output:
        check_output_path(Path(args.output), Path(args.resume), args.force)
    run, model = load_model(args)
    config, device = run.config, run.device
    batch = next(iter(config.build_data_loader(device, test=True)), None)
    if batch is None:
        raise UserError(f"{run.resumed_from}: its test split is empty: no sample batch to trace the model with")
    sample = data_and_target(batch, "export.py")[0].to(device)
    with torch.no_grad():
        output = model(sample)
    if not isinstance(output, torch.Tensor):
        raise UserError(f"{config['arch']['type']} returns {type(output).__name__}: export.py takes a model that "
                        "returns one tensor")
    suffix, write = FORMATS[args.format]
    out = Path(args.output or run.resumed_from.with_suffix(suffix))
    tmp = out.with_name(f".{out.name}{TMP_MARK}{os.getpid()}{suffix}")  # never a half-written or unchecked `out`
    try:
        with torch.no_grad():
            try:
                exported = write(model, sample, tmp)
            except (RuntimeError, ValueError, TypeError, OSError) as e:  # an untraceable model, an unwritable -o
                raise TrainingError(f"{args.format}: cannot export {config['arch']['type']}: "
                                    f"{str(e).strip().splitlines()[0][:200]}") from None
            pairs = [(exported(x).to(device), model(x)) for x in (sample, sample[:1])]
        if not all(output.isfinite().all() for pair in pairs for output in pair):  # NaN - NaN is no difference
            raise TrainingError(f"{args.format}: the model's or the exported file's outputs are not finite (NaN or "
                                f"inf), so they cannot be checked; {out} not written")
        error = max((got - expected).abs().max().item() for got, expected in pairs)
        if error > TOLERANCE:
            raise TrainingError(f"{args.format}: outputs differ from the model's by {error:.3g} (> {TOLERANCE}); "
                                f"{out} not written")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"{args.format}: outputs match the model's (largest difference {error:.2g}, batches of {len(sample)} "
          f"and 1); written to {out}")
    return 0


if __name__ == "__main__":
    run_main(main)
