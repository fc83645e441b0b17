from conftest import make_config, run, run_dirs


def test_train_then_test(tmp_path, tiny_mnist):
    config = make_config(tmp_path, tiny_mnist)
    result = run("train.py", "-c", config)
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(tmp_path / "saved")
    assert (run_dir / "model_best.pth").is_file()
    result = run("test.py", "-r", run_dir / "model_best.pth")
    assert result.returncode == 0, result.stderr
    assert "accuracy" in result.stdout
