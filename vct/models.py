"""Load a Stable Diffusion 1.x model (a diffusers folder, local or s3://, or a single-file
checkpoint: vct/single_file.py) into the parts VCT needs.

The algorithm talks to the UNet through `VCTModels.eps`, which counts sample-evaluations per
stage: compute is the budget of this method (spec §8), so every stage reports what it spent.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vct.errors import UserError
from vct.file_hashes import HashMemo

REQUIRED_FILES = (
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CPU_BF16_ENV = "VCT_ALLOW_CPU_BF16"


class ModelError(UserError, ValueError):
    """The model folder is missing, unreadable or not an SD 1.x diffusers layout."""


@dataclass
class VCTModels:
    """The frozen SD 1.x parts plus what the stages derive from them."""

    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler_config: dict
    device: torch.device
    dtype: torch.dtype
    identity: str
    source: str
    unet_evals: Counter = field(default_factory=Counter)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        """UNet sample_size x VAE factor, as diffusers pipelines do: 512 for SD 1.5."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def latent_scale(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 0.18215))

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    def eps(self, z: torch.Tensor, t: int | torch.Tensor, e: torch.Tensor, *, stage: str,
            grad: bool = False) -> torch.Tensor:
        """UNet noise prediction; counts len(z) evaluations under `stage` (+'_grad' if grad)."""
        self.unet_evals[stage + ("_grad" if grad else "")] += int(z.shape[0])
        if not torch.is_tensor(t):
            t = torch.tensor(t, device=self.device)
        out = self.unet(z.to(self.dtype), t, encoder_hidden_states=e.to(self.dtype)).sample
        return out.float()


def resolve_device(device: str) -> torch.device:
    """The torch device for a ``--device`` value; refused in one line when this machine does
    not have it (CUDA missing, or no such GPU index)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ModelError(f"--device {device}: not a device; use auto, cpu, cuda or cuda:N") \
            from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"--device {device}: CUDA is not available on this machine; use cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ModelError(f"--device {device}: this machine has {torch.cuda.device_count()} "
                         "CUDA device(s)")
    return dev


def cpu_bf16_allowed(allow: bool | None = None) -> bool:
    """Whether bf16 may run off CUDA: `allow` when given, else ``VCT_ALLOW_CPU_BF16=1``."""
    if allow is not None:
        return bool(allow)
    return os.environ.get(CPU_BF16_ENV, "").strip() == "1"


def check_device(device: str, dtype: str, *, allow_cpu_bf16: bool | None = None) -> torch.device:
    """The device and precision rules of :func:`load_models`, without loading anything, so a
    run can refuse them before any work: the device must exist here, and fp16/bf16 need
    CUDA (on CPU they are slow or unsupported, and the inversions want fp32 anyway).

    The one place that decides. bf16 on the CPU is allowed only on explicit opt-in
    (`allow_cpu_bf16=True`, or ``VCT_ALLOW_CPU_BF16=1`` when the argument is None): tests and
    the GPU script's CPU rehearsal use it to run the half-precision path without a GPU. fp16
    is never allowed off CUDA (many CPU kernels lack it)."""
    dev = resolve_device(device)
    if dtype not in DTYPES:
        raise ModelError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if dtype != "fp32" and dev.type != "cuda":
        if not (dtype == "bf16" and cpu_bf16_allowed(allow_cpu_bf16)):
            raise ModelError(f"--dtype {dtype} needs CUDA; on CPU use fp32")
    return dev


def precision_identity(identity: str, dtype: str) -> str:
    """The model identity the cache keys use: the files' identity, plus the UNet precision
    when it is not fp32, so a half-precision result never answers a faithful fp32 request
    (nor the reverse). fp32 keys are the files' identity unchanged."""
    return identity if dtype == "fp32" else f"{identity}+{dtype}"


@dataclass(frozen=True)
class Geometry:
    """What a model folder's configs say about image sizes, read without loading weights."""

    vae_factor: int
    """Pixels per latent cell: 2 ** (VAE blocks - 1), 8 for SD 1.x."""
    unet_factor: int
    """How much the UNet shrinks a latent at its deepest level: 2 ** (down blocks - 1)."""
    native_resolution: int
    """UNet sample_size x VAE factor: 512 for SD 1.5."""
    text_width: int | None = None
    """The text encoder's hidden size D: a concept's vectors are (n, D), 768 for SD 1.5."""

    @property
    def min_resolution(self) -> int:
        """The smallest working size: the UNet's deepest level must be at least 2x2 latent
        cells (at 1x1 its GroupNorms have one value per group and fail), so the latent
        needs more than ``unet_factor`` cells (24 px for the tiny model, 72 for SD 1.5)."""
        return self.vae_factor * (self.unet_factor + 1)


def model_geometry(folder: Path) -> Geometry:
    """The VAE factor, the UNet's down factor, the native size and the text width, from the
    config files."""
    try:
        vae = json.loads((folder / "vae/config.json").read_text())
        unet = json.loads((folder / "unet/config.json").read_text())
        vae_factor = 2 ** (len(vae["block_out_channels"]) - 1)
        unet_factor = 2 ** (len(unet["down_block_types"]) - 1)
        sample = int(unet["sample_size"])
        text = json.loads((folder / "text_encoder/config.json").read_text())
        width = int(text["hidden_size"]) if "hidden_size" in text else None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"model {folder}: unreadable VAE/UNet/text encoder config ({exc})"
                         ) from None
    return Geometry(vae_factor=vae_factor, unet_factor=unet_factor,
                    native_resolution=sample * vae_factor, text_width=width)


def check_layout(folder: Path) -> None:
    """Refuse, in one line, anything that is not an SD 1.x diffusers folder."""
    if not folder.is_dir():
        raise ModelError(f"model {folder}: no such folder (give a diffusers SD 1.x folder, a "
                         ".safetensors/.ckpt checkpoint, or an s3:// URI of either; "
                         "`vct tiny-model DIR` builds a test model)")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if not (folder / "tokenizer").is_dir():
        missing.append("tokenizer/")
    if missing:
        raise ModelError(f"model {folder}: not a Stable Diffusion 1.x diffusers folder "
                         f"(missing {', '.join(missing)})")
    try:
        unet = json.loads((folder / "unet/config.json").read_text())
        text = json.loads((folder / "text_encoder/config.json").read_text())
        vae = json.loads((folder / "vae/config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"model {folder}: unreadable config ({exc})") from None
    width = text.get("hidden_size")
    problems = []
    if unet.get("in_channels") != 4 or vae.get("latent_channels") != 4:
        problems.append("expects 4 latent channels")
    if unet.get("cross_attention_dim") != width:
        problems.append(f"UNet cross_attention_dim {unet.get('cross_attention_dim')} != text "
                        f"width {width}")
    if unet.get("addition_embed_type") or "text_encoder_2" in json.loads(
            (folder / "model_index.json").read_text()):
        problems.append("looks like SDXL or another family")
    if problems:
        raise ModelError(f"model {folder}: not an SD 1.x layout ({'; '.join(problems)})")


def model_identity(folder: Path) -> str:
    """sha256 over every file of the components we load: the cache key's 'which model'.

    File hashes are memoised by (size, mtime) so hashing a 4 GB SD folder happens once.
    """
    from vct.single_file import single_file_identity

    converted = single_file_identity(folder)
    if converted:  # a converted single file: its own bytes (and config), not the conversion's
        return converted
    memo = HashMemo(folder / ".vct-file-hashes.json")
    digest = hashlib.sha256()
    parts = ["model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    files: list[Path] = []
    for part in parts:
        p = folder / part
        files.extend(sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p])
    for f in files:
        rel = f.relative_to(folder).as_posix()
        digest.update(f"{rel}\0{memo.sha256(f, rel)}\n".encode())
    memo.save()
    return digest.hexdigest()


def model_cache_root() -> Path:
    """Where synced s3:// models and converted single files live (VCT_MODEL_CACHE)."""
    return Path(os.environ.get("VCT_MODEL_CACHE", Path.home() / ".cache" / "vct" / "models"))


def local_model_folder(spec: str, cache_root: Path | None = None,
                       config: str | None = None) -> Path:
    """A local diffusers folder for `spec`: an s3:// prefix downloaded once into a cache keyed
    by ETags, a single-file checkpoint (local or s3://) converted once with `config` (None: the
    shipped SD 1.5 configs), or a local folder as given."""
    from vct.single_file import converted_folder, is_single_file

    root = cache_root or model_cache_root()
    if is_single_file(spec):
        return touch_last_used(converted_folder(spec, config, root))
    if config:
        raise ModelError(f"model {spec}: --model-config applies to a single-file checkpoint "
                         "(.safetensors or .ckpt) only; a diffusers folder has its own configs")
    if spec.startswith("s3://"):
        from vct import storage

        try:
            return touch_last_used(storage.sync_prefix(spec, root))
        except storage.StorageError as exc:
            raise ModelError(f"model {spec}: {exc}") from None
    return Path(spec).expanduser()


LAST_USED = ".vct-last-used"
"""An empty file in each model-cache folder, touched at every use (`vct cache --model-cache`)."""


def touch_last_used(folder: Path) -> Path:
    try:
        (folder / LAST_USED).touch()
    except OSError:
        pass  # a read-only cache only loses the record
    return folder


def load_models(spec: str, device: str = "auto", dtype: str = "fp32", *,
                allow_cpu_bf16: bool | None = None, config: str | None = None) -> VCTModels:
    """Load tokenizer, text encoder, UNet and VAE frozen, on `device`; the UNet in `dtype`.

    The precision policy: only the UNet runs in `dtype`. The text encoder and the VAE are
    fp32 on every device, whatever dtype their files hold (a folder saved in fp16 is upcast
    exactly); `VCTModels.eps` casts the UNet's inputs to `dtype` and returns fp32, so every
    latent, embedding, optimizer state and stored result stays fp32 (docs/performance.md).
    The UNet keeps diffusers' default SDPA attention processors; only fusion swaps in the
    controller, and only for its own duration. `allow_cpu_bf16`: see :func:`check_device`;
    `config`: a single-file checkpoint's config folder (:func:`local_model_folder`).
    """
    if not spec:
        raise ModelError("--model is required: a diffusers SD 1.x folder, a single-file "
                         "checkpoint, or an s3:// URI of either")
    folder = local_model_folder(spec, config=config)
    check_layout(folder)
    dev = check_device(device, dtype, allow_cpu_bf16=allow_cpu_bf16)
    torch_dtype = DTYPES[dtype]
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder",
                                                     local_files_only=True)
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet",
                                                    local_files_only=True,
                                                    torch_dtype=torch_dtype)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True)
        scheduler_config = json.loads((folder / "scheduler/scheduler_config.json").read_text())
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"model {folder}: could not load ({first})") from None
    for module in (text_encoder, unet, vae):
        module.requires_grad_(False)
        module.eval()
    # The text encoder and VAE stay fp32 on every device: they are cheap and the concept's
    # gradients flow through the text encoder. Explicit dtypes: a loader may keep a file's own
    # dtype (an fp16 folder), and every hand-off below assumes exactly this split.
    text_encoder.to(dev, torch.float32)
    vae.to(dev, torch.float32)
    unet.to(dev, torch_dtype)
    return VCTModels(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, vae=vae,
                     scheduler_config=scheduler_config, device=dev, dtype=torch_dtype,
                     identity=model_identity(folder), source=spec)
