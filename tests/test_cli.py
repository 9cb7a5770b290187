"""`vct translate` end to end, and one-line errors for bad input (issue: CLI)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from vct.cli import main

FAST = ["--max-train-steps", "3", "--batch-microsteps", "--num-inference-steps", "8",
        "--num-inner-steps", "2", "--quiet"]


def _translate(model, images, out, *extra) -> int:
    return main(["translate", "--model", str(model), "--reference", str(images["ref"]),
                 "--source", str(images["src_a"]), "--source", str(images["src_b"]),
                 "--out", str(out), *FAST, *extra])


def test_translate_end_to_end_and_reproducible(tiny_model_dir, images, tmp_path, capsys):
    assert _translate(tiny_model_dir, images, tmp_path / "a", "--seed", "5") == 0
    printed = capsys.readouterr().out
    for stem in ("src_a", "src_b"):
        png = tmp_path / "a" / f"{stem}.png"
        assert str(png) in printed
        assert Image.open(png).size == (64, 64)
        meta = json.loads((tmp_path / "a" / f"{stem}.json").read_text())
        assert meta["source"]["sha256"] and meta["reference"]["sha256"]
        assert meta["seed"] == 5 and meta["config"]["concept"]["seed"] == 5
        assert meta["config"]["content"]["num_inference_steps"] == 8
        assert meta["config"]["fusion"]["cross_attention_injection_ratio"] == 0.2
        assert meta["unet_evals"]["fusion"] == 3 * 8  # B's 2 passes, B*'s conditional one
        assert meta["unet_evals"]["concept_grad"] == 12
        assert {"concept", "inversion", "fit", "fusion"} <= set(meta["timings"])
        assert meta["model"]["identity"] and meta["versions"]["torch"]
    assert (tmp_path / "a" / "concept.safetensors").is_file()
    assert _translate(tiny_model_dir, images, tmp_path / "b", "--seed", "5") == 0
    for name in ("src_a.png", "src_b.png", "concept.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert not list((tmp_path / "a").glob("*.tmp")) and not list((tmp_path / "a").glob(".*"))


@pytest.fixture()
def bad_inputs(tmp_path, images):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    return {"missing": tmp_path / "nope.png", "text": text}


@pytest.mark.parametrize("case,needle", [
    ("missing_source", "nope.png: no such file"),
    ("not_image", "notes.png: not a readable image"),
    ("wrong_model", "not a Stable Diffusion 1.x diffusers folder"),
    ("missing_model", "no such folder"),
    ("range", "flip_p (--flip-p): must be <= 1.0, got '3'"),
    ("type", "num_inner_steps (--num-inner-steps): expected int, got '2.5'"),
    ("choice", "content_target (--content-target): must be one of pivot or x0"),
])
def test_bad_input_gets_one_line_and_nonzero_exit(case, needle, tiny_model_dir, images,
                                                 bad_inputs, tmp_path, capsys):
    model, ref, src = str(tiny_model_dir), str(images["ref"]), str(images["src_a"])
    extra: list[str] = []
    if case == "missing_source":
        src = str(bad_inputs["missing"])
    elif case == "not_image":
        ref = str(bad_inputs["text"])
    elif case == "wrong_model":
        model = str(tmp_path)
    elif case == "missing_model":
        model = str(tmp_path / "no-model")
    elif case == "range":
        extra = ["--flip-p", "3"]
    elif case == "type":
        extra = ["--num-inner-steps", "2.5"]
    elif case == "choice":
        extra = ["--content-target", "z"]
    code = main(["translate", "--model", model, "--reference", ref, "--source", src,
                 "--out", str(tmp_path / "out"), "--quiet", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("vct: error:") and "\n" not in err and needle in err, err
    assert not (tmp_path / "out").exists()  # nothing was started


def test_errors_never_show_a_traceback(tmp_path, images):
    proc = subprocess.run([sys.executable, "-m", "vct.cli", "translate", "--model",
                           str(tmp_path), "--reference", str(images["ref"]), "--source",
                           str(images["src_a"]), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("vct: error: model ")


def test_tiny_model_command(tmp_path, capsys):
    assert main(["tiny-model", str(tmp_path / "m"), "--seed", "1"]) == 0
    assert (tmp_path / "m" / "unet" / "config.json").is_file()
    assert str(tmp_path / "m") in capsys.readouterr().out


@pytest.mark.parametrize("args,needle", [
    (["missing.csv", "--output", "OUT", "--model", "MODEL"], "manifest not found: missing.csv"),
    (["MANIFEST", "--output", "OUT", "--model", "MODEL", "--set", "concept.bogus=1"],
     "concept.bogus (--bogus): unknown"),
    (["MANIFEST", "--output", "OUT", "--model", "MODEL", "--set", "nodot=1"],
     "is not STAGE.FIELD=VALUE"),
    (["MANIFEST", "--output", "OUT", "--model", "NOMODEL"], "no such folder"),
    (["MANIFEST", "--output", "OUT", "--model", ""], "model (--model): a model is required"),
    (["MANIFEST", "--output", "OUT", "--model", "MODEL", "--content-batch", "0"],
     "content_batch (--content-batch): must be >= 1"),
    (["MANIFEST", "--output", "OUT", "--model", "MODEL", "--device", "gpu"], "device (--device)"),
    (["MANIFEST", "--output", "OUT", "--model", "MODEL", "--run-id", "../x"], "run_id"),
    (["MANIFEST", "--output", "OUT", "--model", "MODEL", "--set",
      "content.inversion_prompt=hello"], "content.inversion_prompt"),
    (["BADMANIFEST", "--output", "OUT", "--model", "MODEL", "--strict"], "line 2"),
    (["MANIFEST", "--output", "OUT", "--model", "MODEL", "--num-processes", "0"],
     "num_processes (--num-processes)"),
    (["MANIFEST", "--output", "AFILE", "--model", "MODEL"], "is a file, not a folder"),
    (["MANIFEST", "--output", "AFILE/sub", "--model", "MODEL"], "is not a folder"),
    (["MANIFEST", "--output", "OUT", "--model", "MODEL", "--device", "cuda:63"],
     "--device cuda:63"),
    (["MANIFEST", "--output", "OUT", "--model", "MODEL", "--device", "cpu", "--dtype", "fp16"],
     "--dtype fp16 needs CUDA"),
    (["MANIFEST", "--output", "OUT", "--model", "MODEL", "--set", "content.resolution=12"],
     "content.resolution (--resolution): 12 is not a multiple of the model's VAE factor 8"),
    (["MANIFEST", "--output", "OUT", "--model", "MODEL", "--reference-resolution", "12"],
     "concept.reference_resolution (--reference-resolution): 12 is not a multiple"),
    (["MANIFEST", "--output", "OUT", "--model", "MODEL", "--reference-resolution", "16"],
     "16 is too small for this model (at least 24"),
])
def test_run_refuses_bad_input_before_starting_prefect(args, needle, tiny_model_dir, tmp_path,
                                                      capsys):
    (tmp_path / "m.csv").write_text("source,reference\na.png,b.png\n")
    (tmp_path / "bad.csv").write_text("source,reference\na.png,\n")
    subs = {"MANIFEST": str(tmp_path / "m.csv"), "BADMANIFEST": str(tmp_path / "bad.csv"),
            "OUT": str(tmp_path / "out"), "NOMODEL": str(tmp_path / "nomodel"),
            "MODEL": str(tiny_model_dir), "missing.csv": "missing.csv",
            "AFILE": str(tmp_path / "a-file"), "AFILE/sub": str(tmp_path / "a-file" / "sub")}
    (tmp_path / "a-file").write_text("not a folder")
    code = main(["run", *[subs.get(a, a) for a in args]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("vct: error:") and needle in err, err
    assert not (tmp_path / "out").exists()


def test_run_refuses_a_missing_output_bucket_before_starting_prefect(tiny_model_dir, tmp_path,
                                                                     s3_server, capsys):
    (tmp_path / "m.csv").write_text("source,reference\na.png,b.png\n")
    code = main(["run", str(tmp_path / "m.csv"), "--output", "s3://no-such-bucket-here/out",
                 "--model", str(tiny_model_dir)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert "bucket 'no-such-bucket-here' does not exist" in err, err


def test_run_without_a_model_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run", str(tmp_path / "m.csv"), "--output", str(tmp_path / "out")])
    assert exit_.value.code == 2 and "--model" in capsys.readouterr().err


def test_translate_and_run_write_bit_identical_pngs(prefect_harness, tiny_model_dir, images,
                                                    tmp_path):
    """One engine behind both commands: the same inputs, seed and thread count give the same
    bytes. The count is set on both sides (run's default leaves a core to its Prefect server).
    (No capsys with flow runs: Prefect's console handler would keep its closed stream.)"""
    assert _translate(tiny_model_dir, images, tmp_path / "tr", "--seed", "3",
                      "--threads", "1") == 0
    (tmp_path / "m.csv").write_text(f"source,reference,output_name\n{images['src_a']},"
                                    f"{images['ref']},a\n{images['src_b']},{images['ref']},b\n")
    code = main(["run", str(tmp_path / "m.csv"), "--output", str(tmp_path / "runs"),
                 "--model", str(tiny_model_dir), "--seed", "3", "--run-id", "r", *FAST[:-1],
                 "--threads", "1"])
    assert code == 0
    assert json.loads((tmp_path / "runs" / "r" / "run.json").read_text())["status"] == "complete"
    for stem, name in (("src_a", "a"), ("src_b", "b")):
        assert (tmp_path / "tr" / f"{stem}.png").read_bytes() == \
            (tmp_path / "runs" / "r" / f"{name}.png").read_bytes(), stem


def test_run_exits_1_when_pairs_failed(prefect_harness, broken_model_dir, images, tmp_path):
    """Every job fails at compute time (the UNet weights are cut short): exit 1, not 2."""
    (tmp_path / "m.csv").write_text(f"source,reference\n{images['src_a']},{images['ref']}\n")
    code = main(["run", str(tmp_path / "m.csv"), "--output", str(tmp_path / "runs"),
                 "--model", str(broken_model_dir), *FAST[:-1], "--run-id", "r"])
    summary = json.loads((tmp_path / "runs" / "r" / "run.json").read_text())
    assert code == 1 and summary["status"] == "failed" and summary["counts"]["pairs_failed"] == 1
    assert not (tmp_path / "runs" / "r" / "_SUCCESS").exists()
