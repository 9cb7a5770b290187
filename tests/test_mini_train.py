"""Training the mini model (vct/mini/train.py): the losses go down, checkpoints resume exactly,
and the command writes a folder the pipeline loads."""

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402

from vct.mini import data as D  # noqa: E402
from vct.mini.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from vct.mini.schedule import lr_at, min_snr_weights  # noqa: E402
from vct.mini.spec import TEST_SPEC  # noqa: E402
from vct.mini.train import (  # noqa: E402
    TrainConfig,
    diffusion_loss,
    step_generator,
    to_pixels,
    vae_loss,
)
from vct.tiny_model import _build_pipeline  # noqa: E402


def _fit(loss_fn, params, steps: int, lr: float) -> tuple[float, float]:
    opt = torch.optim.Adam(params, lr=lr)
    first = None
    for _ in range(steps):
        loss = loss_fn()
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    return first, float(loss_fn().detach())


def test_a_few_steps_on_a_tiny_batch_lower_both_losses() -> None:
    torch.manual_seed(0)
    pipe, _, _ = _build_pipeline(0, TEST_SPEC)
    x = to_pixels(torch.from_numpy(D.images_array(range(2))))
    before, after = _fit(lambda: vae_loss(pipe.vae, x, step_generator(0, "vae", 0), 1e-6),
                         list(pipe.vae.parameters()), 8, 2e-3)
    assert after < 0.8 * before
    ids = pipe.tokenizer(D.captions_for(range(2)), padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    z0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    ac = pipe.scheduler.alphas_cumprod.float()
    params = [*pipe.unet.parameters(), *pipe.text_encoder.parameters()]
    before, after = _fit(lambda: diffusion_loss(pipe.unet, pipe.text_encoder, z0, ids, ac,
                                                step_generator(0, "unet", 0), 5.0),
                         params, 8, 2e-3)
    assert after < 0.8 * before


def test_checkpoints_resume_to_the_same_weights(tmp_path) -> None:
    def run(model, opt, steps):
        for s in steps:
            g = step_generator(0, "unet", s)
            loss = model(torch.randn(4, 3, generator=g)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

    torch.manual_seed(0)
    straight = torch.nn.Linear(3, 2)
    resumed = torch.nn.Linear(3, 2)
    resumed.load_state_dict(straight.state_dict())
    opt_a = torch.optim.AdamW(straight.parameters(), lr=0.1)
    run(straight, opt_a, range(6))
    opt_b = torch.optim.AdamW(resumed.parameters(), lr=0.1)
    run(resumed, opt_b, range(3))
    save_checkpoint(tmp_path / "ckpt", {"m": resumed}, opt_b, {"step": 3})
    fresh = torch.nn.Linear(3, 2)
    opt_c = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    assert load_checkpoint(tmp_path / "ckpt", {"m": fresh}, opt_c)["step"] == 3
    run(fresh, opt_c, range(3, 6))
    assert torch.equal(fresh.weight, straight.weight) and torch.equal(fresh.bias, straight.bias)


def test_schedule_math() -> None:
    assert lr_at(0, 100, 1.0, 10) == 0.1
    assert lr_at(10, 100, 1.0, 10) == 1.0
    assert abs(lr_at(100, 100, 1.0, 10) - 0.1) < 1e-9
    ac = torch.tensor([0.999, 0.5, 0.001])
    w = min_snr_weights(ac, torch.arange(3), 5.0)
    assert w[0] < 0.01 and w[1] == 1.0 and w[2] == 1.0  # only high-SNR steps are damped


def test_the_command_writes_a_loadable_model_and_resumes(tmp_path) -> None:
    from vct.cli import main
    from vct.models import load_models

    args = ["train-mini", str(tmp_path / "run"), "--spec", "test", "--images", "8",
            "--heldout", "4", "--vae-steps", "2", "--vae-batch", "2", "--decoder-steps", "1",
            "--unet-steps", "2",
            "--unet-batch", "2", "--checkpoint-every", "1", "--warmup", "1", "--quiet",
            "--threads", "1"]
    assert main(args) == 0
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in rows] == [("vae", 1), ("vae", 2), ("decoder", 1),
                                                       ("unet", 1), ("unet", 2)]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["scaling_factor"] > 0 and "decoder_heldout_psnr_db" in summary
    models = load_models(str(run / "model"), "cpu")
    assert models.native_resolution == D.SIZE
    assert models.latent_scale == summary["scaling_factor"]
    ids = models.tokenizer("a red dotted star on a lined background").input_ids
    assert len(ids) == 2 + 8  # every caption word is one token
    # a rerun finds every stage done and trains nothing more
    assert main(args) == 0
    assert len((run / "losses.jsonl").read_text().splitlines()) == 5
    assert TrainConfig.from_dict(json.loads((run / "config.json").read_text())).spec == "test"
