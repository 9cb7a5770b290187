"""The half of the regeneration that runs in the OLD virtual environment (see regenerate.py).

Run only by `regenerate.py`, with the interpreter of a venv holding the original's library
versions (diffusers 0.10.1, transformers 4.26.1, accelerate 0.15.0, tokenizers 0.13.3,
huggingface_hub 0.12.1, numpy < 2, torch 2.13 CPU). It never imports `vct` or anything of the
project venv. Three subcommands:

- `convert NEW OLD`: rewrite the tiny model folder into the layout the old classes load
  (VAE attention keys `to_q/k/v/out.0` -> `query/key/value/proj_attn`, the text encoder's keys
  under `text_model.`, `.bin` weights, config keys the old classes' constructors do not take
  dropped, a slow-tokenizer config). The `.bin` files are pickles, which is why they only ever
  live in a temporary folder outside the repository.
- `parity OLD INPUTS OUT DTYPE`: every component of the converted model on the fixed inputs that
  regenerate.py wrote, so that it can compare them with the same components in the project
  venv before trusting anything the original produces.
- `run ...`: a patched temporary copy of the original's code, driven as its `__main__` does
  (concept training, then content inversion and fusion), with recorders around a few of its
  methods; writes what it produced to a safetensors file.

Why patches at all: the original hard-codes `.to("cuda")` and a 512-pixel working size, and
imports torchvision (which does not import with torch 2.13), datasets (for log levels only),
OpenCV and IPython (for notebook display helpers the run never calls): stand-ins replace them.
The patches are text substitutions on a temporary copy, each checked to match exactly as often
as expected, so a different checkout of the original fails loudly instead of running something
else. Nothing else of the original is changed.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import inspect
import json
import os
import shutil
import sys
import tempfile
import types
from pathlib import Path

import torch

VAE_RENAMES = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.",
               ".to_out.0.": ".proj_attn."}


# ---------------------------------------------------------------- convert
def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _kept_config(config: dict, cls: type) -> tuple[dict, list[str]]:
    """The config keys `cls.__init__` accepts (plus the `_` bookkeeping ones) and the rest."""
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    kept = {k: v for k, v in config.items() if k in accepted or k.startswith("_")}
    return kept, sorted(set(config) - set(kept))


def convert(new: Path, old: Path) -> dict:
    """Write the old-format copy of the tiny model; return what was dropped or renamed."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    report: dict = {"dropped_config_keys": {}}
    old.mkdir(parents=True)
    # pipeline index: the components SD 1.x pipelines of diffusers 0.10 know
    index = json.loads((new / "model_index.json").read_text())
    keep = ("scheduler", "text_encoder", "tokenizer", "unet", "vae")
    (old / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.10.1",
        "feature_extractor": [None, None], "safety_checker": [None, None],
        "requires_safety_checker": False, **{k: index[k] for k in keep}}, indent=1))
    report["dropped_config_keys"]["model_index"] = sorted(
        set(index) - set(keep) - {"_class_name", "_diffusers_version", "feature_extractor",
                                  "safety_checker", "requires_safety_checker"})
    for name, cls in (("scheduler", DDIMScheduler), ("unet", UNet2DConditionModel),
                      ("vae", AutoencoderKL)):
        src = new / name / ("scheduler_config.json" if name == "scheduler" else "config.json")
        kept, dropped = _kept_config(json.loads(src.read_text()), cls)
        kept["_diffusers_version"] = "0.10.1"
        (old / name).mkdir()
        (old / name / src.name).write_text(json.dumps(kept, indent=1))
        report["dropped_config_keys"][name] = dropped
    unet = _load_safetensors(new / "unet" / "diffusion_pytorch_model.safetensors")
    torch.save(unet, old / "unet" / "diffusion_pytorch_model.bin")
    vae = {}
    for key, tensor in _load_safetensors(new / "vae" / "diffusion_pytorch_model.safetensors").items():
        if ".attentions." in key:
            for a, b in VAE_RENAMES.items():
                key = key.replace(a, b)
        vae[key] = tensor
    torch.save(vae, old / "vae" / "diffusion_pytorch_model.bin")
    # text encoder: transformers 5 saves CLIPTextModel's keys without the `text_model.` prefix
    (old / "text_encoder").mkdir()
    text = {("text_model." + k if not k.startswith("text_model.") else k): v
            for k, v in _load_safetensors(new / "text_encoder" / "model.safetensors").items()}
    torch.save(text, old / "text_encoder" / "pytorch_model.bin")
    tconf = json.loads((new / "text_encoder" / "config.json").read_text())
    dropped = [k for k in ("dtype",) if k in tconf]
    for k in dropped:
        tconf.pop(k)
    tconf.update(torch_dtype="float32", transformers_version="4.26.1")
    (old / "text_encoder" / "config.json").write_text(json.dumps(tconf, indent=1))
    report["dropped_config_keys"]["text_encoder"] = dropped
    # slow CLIP tokenizer: vocab + merges, and a config the 4.26 tokenizer reads
    (old / "tokenizer").mkdir()
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(new / "tokenizer" / f, old / "tokenizer" / f)
    tok = json.loads((new / "tokenizer" / "tokenizer_config.json").read_text())
    special = {k: tok[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (old / "tokenizer" / "special_tokens_map.json").write_text(json.dumps(special, indent=1))
    (old / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({
        **special, "model_max_length": tok["model_max_length"], "do_lower_case": True,
        "errors": "replace", "tokenizer_class": "CLIPTokenizer"}, indent=1))
    report["weights"] = {"vae_renamed": sorted(k for k in vae if ".attentions." in k),
                         "text_prefixed": len(text)}
    _check_loaded(old, {"unet": unet, "vae": vae, "text_encoder": text})
    return report


def _check_loaded(old: Path, files: dict[str, dict[str, torch.Tensor]]) -> None:
    """Every weight the old classes load equals the file's, and none is left at its init."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL),
                      ("text_encoder", CLIPTextModel)):
        state = cls.from_pretrained(str(old), subfolder=name).state_dict()
        missing = sorted(set(state) - set(files[name]) - {"text_model.embeddings.position_ids"})
        unexpected = sorted(set(files[name]) - set(state))
        if missing or unexpected:
            raise SystemExit(f"{name}: keys missing {missing[:5]}, unexpected {unexpected[:5]}")
        for key, value in files[name].items():
            if not torch.equal(state[key], value):
                raise SystemExit(f"{name}: {key} differs after loading")


# ---------------------------------------------------------------- parity
@torch.no_grad()
def parity(old: Path, inputs: Path, out: Path, dtype: str) -> None:
    """The converted components on regenerate.py's fixed inputs (compared there), in float32
    (what the run uses) or float64 (where rounding vanishes and only the math is compared)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.set_num_threads(1)
    dt = getattr(torch, dtype)
    x = {k: v.to(dt) if v.is_floating_point() else v for k, v in load_file(str(inputs)).items()}
    with safe_open(str(inputs), framework="pt") as f:
        prompts = json.loads(f.metadata()["prompts"])
    tok = CLIPTokenizer.from_pretrained(str(old), subfolder="tokenizer")
    text = CLIPTextModel.from_pretrained(str(old), subfolder="text_encoder").eval().to(dt)
    unet = UNet2DConditionModel.from_pretrained(str(old), subfolder="unet").eval().to(dt)
    vae = AutoencoderKL.from_pretrained(str(old), subfolder="vae").eval().to(dt)
    sched = DDIMScheduler.from_pretrained(str(old), subfolder="scheduler")
    sched.set_timesteps(50)
    got = {"unet": unet(x["z"], int(x["t"]), encoder_hidden_states=x["states"]).sample,
           "vae_decode": vae.decode(x["latent"]).sample,
           "alphas_cumprod": sched.alphas_cumprod,
           "timesteps": sched.timesteps.to(torch.int64)}
    dist = vae.encode(x["image"]).latent_dist
    got["vae_mean"], got["vae_std"] = dist.mean, dist.std
    for i, prompt in enumerate(prompts):
        ids = tok(prompt, padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids
        got[f"ids_{i}"] = ids.to(torch.int64)
        got[f"text_{i}"] = text(ids)[0]
    save_file({k: v.contiguous() for k, v in got.items()}, str(out))


# ---------------------------------------------------------------- run
def install_stand_ins() -> None:
    """torchvision (RandomHorizontalFlip only), datasets (log levels only), cv2 and IPython.

    The flip draws `torch.rand(1) < p` from the global generator and mirrors the PIL image,
    as torchvision's does, so the original's random stream is the one it had. The libraries
    are imported first, so that their own checks for these packages still find none."""
    import importlib.machinery

    import accelerate  # noqa: F401
    import diffusers  # noqa: F401
    import transformers  # noqa: F401
    from PIL import Image

    class RandomHorizontalFlip:
        def __init__(self, p: float = 0.5):
            self.p = p

        def __call__(self, img):
            if torch.rand(1) < self.p:
                return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            return img

    def module(name: str) -> types.ModuleType:
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
        sys.modules[name] = mod
        return mod

    tv = module("torchvision")
    tv.transforms = module("torchvision.transforms")
    tv.transforms.RandomHorizontalFlip = RandomHorizontalFlip
    module("datasets").utils = types.SimpleNamespace(logging=types.SimpleNamespace(
        set_verbosity_warning=lambda: None, set_verbosity_error=lambda: None))
    # ptp_utils imports OpenCV and IPython for its notebook display helpers only (text under
    # an image, showing a grid), which the run never calls: empty stand-ins.
    module("cv2")
    module("IPython").display = module("IPython.display")
    sys.modules["IPython.display"].display = lambda *a, **k: None


def patches(resolution: int) -> list[tuple[str, str, str, int]]:
    """(file, old text, new text, expected count): CPU instead of CUDA, the working size."""
    return [
        ("pivot_turning_inversion.py", '.to("cuda")', '.to("cpu")', 2),
        ("ptp_inversion.py", "resize((512, 512))", f"resize(({resolution}, {resolution}))", 1),
        ("ptp_inversion.py", "height = width = 512", f"height = width = {resolution}", 2),
    ]


def patched_copy(original: Path, dest: Path, resolution: int) -> dict[str, str]:
    """Copy the original's .py files into dest and apply the patches; sha256 of the originals."""
    digests = {}
    for path in sorted(original.glob("*.py")):
        digests[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copy(path, dest / path.name)
    for name, old, new, count in patches(resolution):
        text = (dest / name).read_text()
        if text.count(old) != count:
            raise SystemExit(f"{name}: {old!r} found {text.count(old)} times, expected {count}: "
                             "not the original this script was written for")
        (dest / name).write_text(text.replace(old, new))
    return digests


class Recorder:
    """What the original computes, taken from its own calls (wrapped, not re-implemented)."""

    def __init__(self):
        self.inversion = None
        self.embeddings = None
        self.final_latents = None
        self.timesteps = None
        self.steps_offset = None
        self.adam_steps: list[int] = []

    def install(self, ptp_inversion) -> None:
        rec = self
        cls = ptp_inversion.Inversion
        forward, fit, backward = (cls.forward_diffusion, cls.null_optimization_path,
                                  cls.backward_diffusion_ptp)

        def forward_diffusion(self, *a, **k):
            out = forward(self, *a, **k)
            rec.inversion = torch.cat([z.detach().clone() for z in out])
            return out

        def null_optimization_path(self, *a, **k):
            out = fit(self, *a, **k)
            rec.embeddings = torch.cat([e.detach().clone() for e in out[0]])
            rec.timesteps = [int(t) for t in self.model.scheduler.timesteps]
            rec.steps_offset = int(self.model.scheduler.config.steps_offset)
            return out

        def backward_diffusion_ptp(self, *a, **k):
            out = backward(self, *a, **k)
            rec.final_latents = out.detach().clone()
            return out

        cls.forward_diffusion = forward_diffusion
        cls.null_optimization_path = null_optimization_path
        cls.backward_diffusion_ptp = backward_diffusion_ptp

        class CountingAdam(ptp_inversion.Adam):
            """The fit makes one Adam per sampling step: its step() calls are J_s."""

            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                self._slot = len(rec.adam_steps)
                rec.adam_steps.append(0)

            def step(self, *a, **k):
                rec.adam_steps[self._slot] += 1
                return super().step(*a, **k)

        ptp_inversion.Adam = CountingAdam


def run(opts: argparse.Namespace) -> None:
    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    install_stand_ins()
    work = Path(tempfile.mkdtemp(prefix="vct-original-run-"))
    code = work / "code"
    code.mkdir()
    digests = patched_copy(Path(opts.original), code, opts.resolution)
    for d in ("concept", "content", "images", "out"):
        (work / d).mkdir()
    shutil.copy(opts.reference, work / "concept" / "reference.png")
    shutil.copy(opts.source, work / "content" / "source.png")
    sys.path.insert(0, str(code))
    os.chdir(work)
    import main as original_main
    import pivot_turning_inversion
    import ptp_inversion

    rec = Recorder()
    rec.install(ptp_inversion)
    sys.argv = ["main.py", f"--concept_image_dir={work / 'concept'}",
                f"--content_image_dir={work / 'content'}",
                f"--pretrained_model_name_or_path={opts.model}",
                f"--output_image_path={work / 'images'}", f"--output_dir={work / 'out'}",
                f"--initializer_token={opts.initializer}",
                f"--max_train_steps={opts.max_train_steps}",
                f"--concept_embedding_num={opts.num_vectors}",
                "--cross_attention_injection_ratio=0.2", "--self_attention_injection_ratio=0.9",
                "--use_l1", f"--seed={opts.seed}", f"--resolution={opts.resolution}",
                "--only_save_embeds"]
    args = original_main.multi_concept_inversion()
    pivot_turning_inversion.inversion(
        args.output_dir, args.content_image_dir, args.output_image_path, args.concept_image_dir,
        args.max_train_steps, args.cross_attention_injection_ratio,
        args.self_attention_injection_ratio, args.pretrained_model_name_or_path)
    saved = glob.glob(os.path.join(args.output_dir, f"_s2__{opts.max_train_steps}.bin"))
    if len(saved) != 1:
        raise SystemExit(f"expected one saved concept, found {saved}")
    vectors = torch.load(saved[0])["<s2>"].float()
    (image_path,) = sorted((work / "images").glob("*.png"))
    image = torch.from_numpy(np.array(Image.open(image_path).convert("RGB")))
    tensors = {"x_T": rec.inversion[-1:].clone(), "inversion_latents": rec.inversion,
               "embeddings": rec.embeddings, "iterations": torch.tensor(rec.adam_steps),
               "timesteps": torch.tensor(rec.timesteps), "concept_vectors": vectors,
               "final_latents": rec.final_latents, "image": image}
    import accelerate
    import diffusers
    import transformers

    meta = {"steps_offset": rec.steps_offset, "original_files_sha256": digests,
            "patches": [list(p[:3]) for p in patches(opts.resolution)],
            # the temporary folders vary per run: named, so the header's bytes do not
            "argv": [a.replace(str(work), "<run>").replace(str(opts.model), "<old-model>")
                     for a in sys.argv[1:]],
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                         "transformers": transformers.__version__,
                         "accelerate": accelerate.__version__, "numpy": np.__version__,
                         "python": sys.version.split()[0]},
            "threads": torch.get_num_threads()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, opts.out,
              metadata={"original_run": json.dumps(meta, sort_keys=True)})
    shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert")
    c.add_argument("new", type=Path)
    c.add_argument("old", type=Path)
    p = sub.add_parser("parity")
    p.add_argument("old", type=Path)
    p.add_argument("inputs", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("dtype", choices=("float32", "float64"))
    r = sub.add_parser("run")
    for name in ("original", "model", "source", "reference", "out", "initializer"):
        r.add_argument(f"--{name}", required=True)
    for name in ("max_train_steps", "num_vectors", "seed", "resolution"):
        r.add_argument(f"--{name}", type=int, required=True)
    opts = parser.parse_args()
    if opts.cmd == "convert":
        print(json.dumps(convert(opts.new, opts.old)))
    elif opts.cmd == "parity":
        parity(opts.old, opts.inputs, opts.out, opts.dtype)
    else:
        run(opts)


if __name__ == "__main__":
    main()
