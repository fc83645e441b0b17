"""predict.py and export.py as real processes, on checkpoints of real runs: MNIST (tiny) and an image folder."""

import csv
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, make_config, read_test_results, run, run_dirs, write_image_folder
from data_loader.data_loaders import MNIST_MEAN, MNIST_STD
from data_loader.datasets import read_idx
from model.model import MnistModel
from utils.cli import run_main

ONNX_MISSING = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def mnist_test_images(data_dir, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` test images, uint8 (N, 28, 28), and as the model reads them (N, 1, 28, 28)."""
    images = read_idx(data_dir / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz")[:count]
    return images, ((images.float() / 255 - MNIST_MEAN) / MNIST_STD).unsqueeze(1)


def saved_model(checkpoint) -> MnistModel:
    model = MnistModel()
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    return model.eval()


def fails_with_one_line(result: subprocess.CompletedProcess, text: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert text in result.stderr


@pytest.fixture(scope="module")
def mnist_checkpoint(tmp_path_factory, tiny_mnist):
    """latest.pth of a 2-epoch MnistModel run on tiny MNIST (1,024 training and 256 test images)."""
    folder = tmp_path_factory.mktemp("mnist_run")
    result = run("train.py", "-c", make_config(folder, tiny_mnist, {"trainer.tensorboard": False}), "-d", "cpu")
    assert result.returncode == 0, result.stderr
    return run_dirs(folder / "saved")[0] / "latest.pth"


@pytest.fixture(scope="module")
def image_checkpoint(tmp_path_factory):
    """latest.pth of a 1-epoch resnet18 run on <root>/{train,test}/{dark,light}/*.png (16 + 4 per class)."""
    root = write_image_folder(tmp_path_factory.mktemp("images") / "images")
    result = run("train.py", "-c", ROOT / "configs/image_folder.json", "--epochs", "1", "--bs", "8", "-d", "cpu",
                 "--set", f"data_loader.args.data_dir={root}", "data_loader.args.image_size=32",
                 "data_loader.args.num_workers=0", f"trainer.save_dir={root / 'saved'}", "trainer.tensorboard=false")
    assert result.returncode == 0, result.stderr
    return root, run_dirs(root / "saved", "image_folder")[0] / "latest.pth"


# ---- -r <run dir> and test.py's results ----------------------------------------------------------------
def test_a_run_directory_gives_its_best_checkpoint_else_latest_and_every_evaluation_is_kept(tmp_path,
                                                                                             mnist_checkpoint):
    run_dir = shutil.copytree(mnist_checkpoint.parent, tmp_path / "run")
    for target in (run_dir / "latest.pth", run_dir):
        tested = run("test.py", "-r", target)
        assert tested.returncode == 0, tested.stderr
        assert f"results written to {run_dir / 'test-results.jsonl'}" in tested.stdout
    assert f"{run_dir}: using model_best.pth" in tested.stdout
    assert [Path(r["checkpoint"]).name for r in read_test_results(run_dir)] == ["latest.pth", "model_best.pth"]
    predicted = run("predict.py", "-r", run_dir)
    assert predicted.returncode == 0, predicted.stderr
    assert (run_dir / "model_best-predictions.csv").is_file()
    assert run("predict.py", "-r", run_dir).returncode == 0  # the default output replaces its previous one
    (run_dir / "model_best.pth").unlink()
    exported = run("export.py", "-r", run_dir, "--format", "torchscript")
    assert exported.returncode == 0, exported.stderr
    assert f"{run_dir}: using latest.pth" in exported.stdout and (run_dir / "latest.torchscript.pt").is_file()
    fails_with_one_line(run("test.py", "-r", tmp_path), f"{tmp_path}: no model_best.pth or latest.pth")


# ---- predict.py ---------------------------------------------------------------------------------------
def test_predictions_on_the_test_split_agree_with_test_py(mnist_checkpoint):
    tested = run("test.py", "-r", mnist_checkpoint)
    assert tested.returncode == 0, tested.stderr
    accuracy = read_test_results(mnist_checkpoint.parent)[-1]["accuracy"]

    predicted = run("predict.py", "-r", mnist_checkpoint, "--topk", "3")
    assert predicted.returncode == 0, predicted.stderr
    rows = read_csv(mnist_checkpoint.with_name("latest-predictions.csv"))
    assert list(rows[0]) == ["index", "target", "class", "probability", "top3"]
    assert [row["index"] for row in rows] == [str(i) for i in range(256)]
    assert sum(row["class"] == row["target"] for row in rows) / len(rows) == pytest.approx(accuracy, abs=1e-6)
    assert 0.5 < accuracy < 1  # a trained model, not a constant answer
    top = [entry.split(":") for entry in rows[0]["top3"].split(";")]
    assert len(top) == 3 and top[0] == [rows[0]["class"], rows[0]["probability"]]
    assert {row["class"] for row in rows} <= set("0123456789")


def test_image_files_are_read_as_training_read_them(mnist_checkpoint, tiny_mnist, tmp_path):
    from PIL import Image

    images, inputs = mnist_test_images(tiny_mnist, 12)
    (tmp_path / "digits").mkdir()
    for i, image in enumerate(images[:10]):
        Image.fromarray(image.numpy()).save(tmp_path / "digits" / f"{i:02d}.png")
    Image.fromarray(images[10].numpy()).save(tmp_path / "ten.png")
    out = tmp_path / "out.csv"
    result = run("predict.py", "-r", mnist_checkpoint, tmp_path / "digits", tmp_path / "ten.png", "-o", out,
                 "--bs", "4")
    assert result.returncode == 0, result.stderr

    rows = read_csv(out)
    assert [row["path"] for row in rows] == [str(tmp_path / "digits" / f"{i:02d}.png") for i in range(10)] + [
        str(tmp_path / "ten.png")]
    with torch.no_grad():
        probs = saved_model(mnist_checkpoint)(inputs[:11]).softmax(dim=1)
    assert [row["class"] for row in rows] == [str(i) for i in probs.argmax(dim=1).tolist()]
    torch.testing.assert_close(torch.tensor([float(row["probability"]) for row in rows]), probs.max(dim=1).values,
                               atol=1e-4, rtol=0)


@pytest.mark.slow
def test_image_folder_predictions_name_the_classes(image_checkpoint, tmp_path):
    root, image_checkpoint = image_checkpoint
    assert torch.load(image_checkpoint, weights_only=True)["classes"] == ["dark", "light"]
    test_dir = root / "test"
    result = run("predict.py", "-r", image_checkpoint, test_dir, "-o", tmp_path / "files.csv")
    assert result.returncode == 0, result.stderr
    rows = read_csv(tmp_path / "files.csv")
    assert len(rows) == 8 and {row["class"] for row in rows} <= {"dark", "light"}
    assert all(set(dict(e.split(":") for e in row["top5"].split(";"))) == {"dark", "light"} for row in rows)

    result = run("predict.py", "-r", image_checkpoint, "-o", tmp_path / "split.csv")  # the test split
    assert result.returncode == 0, result.stderr
    assert [row["target"] for row in read_csv(tmp_path / "split.csv")] == ["dark"] * 4 + ["light"] * 4

    old = torch.load(image_checkpoint, weights_only=True)
    del old["classes"]  # a checkpoint from before class names were saved
    torch.save(old, tmp_path / "old.pth")
    result = run("predict.py", "-r", tmp_path / "old.pth", test_dir, "-o", tmp_path / "old.csv")
    assert result.returncode == 0, result.stderr
    assert [row["class"] for row in read_csv(tmp_path / "old.csv")] == [
        {"dark": "0", "light": "1"}[row["class"]] for row in rows]


# ---- export.py ----------------------------------------------------------------------------------------
def loaded(fmt: str, path):
    """The exported file as a callable, loaded by its own runtime (no code of this project)."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])
    return torch.jit.load(str(path)) if fmt == "torchscript" else torch.export.load(str(path)).module()


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
@pytest.mark.parametrize("fmt", [
    pytest.param("onnx", marks=pytest.mark.skipif(bool(ONNX_MISSING), reason=f"--format onnx needs {ONNX_MISSING} "
                                                  "(pip install -r requirements-export.txt)")),
    "torchscript", "exported"])
def test_exported_file_reproduces_the_model(mnist_checkpoint, tiny_mnist, tmp_path, fmt):
    out = tmp_path / f"model.{fmt}"
    result = run("export.py", "-r", mnist_checkpoint, "--format", fmt, "-o", out)
    assert result.returncode == 0, result.stderr
    assert f"written to {out}" in result.stdout and [p.name for p in tmp_path.iterdir()] == [out.name]

    _, inputs = mnist_test_images(tiny_mnist, 37)  # another batch size than the export's (64)
    with torch.no_grad():
        expected, got = saved_model(mnist_checkpoint)(inputs), loaded(fmt, out)(inputs)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_a_ddp_checkpoint_exports_like_a_single_process_one(mnist_checkpoint, tiny_mnist, tmp_path):
    """Checkpoints hold the unwrapped model: no 'module.' prefix, the same exported program."""
    config = make_config(tmp_path, tiny_mnist, {"trainer.tensorboard": False, "trainer.epochs": 1})
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train.py", "-c", config, "-d", "cpu"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "CI": "true"})
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    checkpoint = run_dirs(tmp_path / "saved")[0] / "latest.pth"
    assert "2 processes" in (checkpoint.parent / "train.log").read_text()
    programs = {}
    for name, path in (("single", mnist_checkpoint), ("ddp", checkpoint)):
        result = run("export.py", "-r", path, "--format", "exported", "-o", tmp_path / f"{name}.pt2")
        assert result.returncode == 0, result.stderr
        programs[name] = torch.export.load(str(tmp_path / f"{name}.pt2"))
    weights = saved_model(checkpoint).state_dict()
    assert programs["ddp"].state_dict.keys() == programs["single"].state_dict.keys() == weights.keys()
    assert programs["ddp"].graph_module.code == programs["single"].graph_module.code
    _, inputs = mnist_test_images(tiny_mnist, 8)
    with torch.no_grad():
        torch.testing.assert_close(programs["ddp"].module()(inputs), saved_model(checkpoint)(inputs))


# ---- -o: never a checkpoint or a run's file; an existing file only with --force -------------------------
def test_an_output_is_never_a_checkpoint_or_in_a_run_directory(mnist_checkpoint, tmp_path):
    run_dir = shutil.copytree(mnist_checkpoint.parent, tmp_path / "run")
    checkpoint, before = run_dir / "latest.pth", (run_dir / "latest.pth").read_bytes()
    (tmp_path / "link").symlink_to(checkpoint)
    (tmp_path / "old.pth").write_bytes(b"old")
    for script, out, message in [
            ("predict.py", checkpoint, "is the checkpoint being read"),
            ("export.py", tmp_path / "run" / ".." / "run" / "latest.pth", "is the checkpoint being read"),
            ("export.py", tmp_path / "link", "is the checkpoint being read"),
            ("predict.py", tmp_path / "old.pth", "a .pth file is a checkpoint"),
            ("export.py", run_dir / "model.pt2", f"inside the run directory {run_dir}")]:
        extra = ["--format", "exported"] if script == "export.py" else []
        fails_with_one_line(run(script, "-r", checkpoint, *extra, "-o", out, "--force"), f"-o {out}: {message}")
    assert checkpoint.read_bytes() == before and (tmp_path / "old.pth").read_bytes() == b"old"
    assert not (run_dir / "model.pt2").exists()


def test_an_existing_output_is_replaced_only_with_force(mnist_checkpoint, tmp_path):
    out = tmp_path / "out.csv"
    out.write_text("mine\n")
    fails_with_one_line(run("predict.py", "-r", mnist_checkpoint, "-o", out),
                        f"-o {out}: already exists; add --force to replace it")
    fails_with_one_line(run("export.py", "-r", mnist_checkpoint, "--format", "exported", "-o", out),
                        f"-o {out}: already exists; add --force to replace it")
    assert out.read_text() == "mine\n"
    result = run("predict.py", "-r", mnist_checkpoint, "-o", out, "--force")
    assert result.returncode == 0, result.stderr
    assert len(read_csv(out)) == 256


def test_non_finite_outputs_never_match(mnist_checkpoint, tmp_path):
    """NaN - NaN is NaN, which no tolerance refuses: outputs that are not finite fail the check."""
    state = torch.load(mnist_checkpoint, weights_only=True)
    state["model"] = {key: torch.full_like(value, float("nan")) for key, value in state["model"].items()}
    torch.save(state, tmp_path / "nan.pth")
    result = run("export.py", "-r", tmp_path / "nan.pth", "--format", "exported", "-o", tmp_path / "nan.pt2")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "outputs are not finite (NaN or inf), so they cannot be checked" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["nan.pth"]


# ---- bad inputs: one line, exit 2, nothing written ------------------------------------------------------
def test_bad_inputs_are_one_line_and_exit_2(mnist_checkpoint, tmp_path):
    """As real processes (stderr, exit code) for a few; the rest in this process through the same run_main."""
    (tmp_path / "broken.png").write_text("not an image")
    out = tmp_path / "out.csv"
    fails_with_one_line(run("predict.py", "-r", tmp_path / "missing.pth", "-o", out),
                        f"error: {tmp_path / 'missing.pth'}: checkpoint not found")
    fails_with_one_line(run("predict.py", "-r", mnist_checkpoint, tmp_path / "broken.png", "-o", out),
                        f"error: {tmp_path / 'broken.png'}: cannot read image")
    fails_with_one_line(run("export.py", "-r", mnist_checkpoint, "--format", "tflite", "-o", out),
                        "invalid choice: 'tflite'")
    assert not out.exists()


@pytest.mark.parametrize("script, args, message", [
    ("export", ["-r", "{tmp}/missing.pth", "--format", "onnx"], "{tmp}/missing.pth: checkpoint not found"),
    ("predict", ["-r", "{ckpt}", "{tmp}/colour.png"],
     "{tmp}/colour.png: a 3-channel image (RGB); this model reads 1-channel (grayscale) images"),
    ("predict", ["-r", "{ckpt}", "{tmp}/nothing.png"], "{tmp}/nothing.png: no such file or folder"),
    ("predict", ["-r", "{ckpt}", "{tmp}/empty"], "{tmp}/empty: no images in this folder"),
    ("predict", ["-r", "{ckpt}", "--topk", "0"], "--topk must be at least 1, got 0"),
])
def test_more_bad_inputs(mnist_checkpoint, tmp_path, capsys, script, args, message):
    from PIL import Image

    Image.new("RGB", (28, 28)).save(tmp_path / "colour.png")
    (tmp_path / "empty").mkdir()
    fill = {"tmp": tmp_path, "ckpt": mnist_checkpoint}
    main = __import__(script).main
    with pytest.raises(SystemExit) as stopped:
        run_main(lambda: main([arg.format(**fill) for arg in args] + ["-o", str(tmp_path / "out")]))
    assert stopped.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: {message.format(**fill)}")
    assert not (tmp_path / "out").exists()


def test_onnx_without_its_packages_is_one_line(mnist_checkpoint, monkeypatch, capsys, tmp_path):
    import export

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(SystemExit) as stopped:
        run_main(lambda: export.main(["-r", str(mnist_checkpoint), "--format", "onnx", "-o", str(tmp_path / "m")]))
    assert stopped.value.code == 2
    assert capsys.readouterr().err == "error: --format onnx needs onnxruntime: pip install -r requirements-export.txt\n"
    assert not list(tmp_path.iterdir())


def test_an_export_that_does_not_match_writes_nothing(mnist_checkpoint, monkeypatch, capsys, tmp_path):
    import export

    monkeypatch.setattr(export, "TOLERANCE", -1.0)  # no file can pass
    with pytest.raises(SystemExit) as stopped:
        run_main(lambda: export.main(["-r", str(mnist_checkpoint), "--format", "exported", "-o", str(tmp_path / "m")]))
    assert stopped.value.code == 1
    assert capsys.readouterr().err.startswith("error: exported: outputs differ from the model's by 0 (> -1.0)")
    assert not list(tmp_path.iterdir())  # neither the file nor its temporary


def test_a_checkpoints_config_is_data_for_predict_too(mnist_checkpoint, capsys, tmp_path):
    import predict

    state = torch.load(mnist_checkpoint, weights_only=True)
    state["config"]["arch"]["type"] = "os.system"
    torch.save(state, tmp_path / "untrusted.pth")
    with pytest.raises(SystemExit) as stopped:
        run_main(lambda: predict.main(["-r", str(tmp_path / "untrusted.pth")]))
    assert stopped.value.code == 2
    assert "os.system" in capsys.readouterr().err and not (tmp_path / "untrusted-predictions.csv").exists()
