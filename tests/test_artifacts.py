"""Stage results on disk: bit-exact round trips, verification, textual-inversion export."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from vct.artifacts import (
    ArtifactError,
    Stored,
    encode,
    load_result,
    result_bytes,
    textual_inversion_bytes,
)
from vct.concept import learn_concept
from vct.config import ConceptConfig, ContentConfig, to_dict
from vct.content import invert_content


@pytest.fixture(scope="module")
def content(models, images):
    return invert_content(models, Image.open(images["src_b"]).convert("RGB"),
                          ContentConfig(num_inference_steps=6, num_inner_steps=2))


@pytest.fixture(scope="module")
def concept(models, images):
    return learn_concept(models, Image.open(images["ref"]).convert("RGB"),
                         ConceptConfig(max_train_steps=2, batch_microsteps=True))


def _header(data: bytes) -> dict:
    n = int.from_bytes(data[:8], "little")
    return json.loads(json.loads(data[8:8 + n])["__metadata__"]["vct"])


def _rewrite_header(data: bytes, edit) -> bytes:
    """The same file with its JSON header edited (the checksum left as it was)."""
    n = int.from_bytes(data[:8], "little")
    outer = json.loads(data[8:8 + n])
    header = json.loads(outer["__metadata__"]["vct"])
    edit(header)
    outer["__metadata__"]["vct"] = json.dumps(header, sort_keys=True)
    blob = json.dumps(outer).encode()
    blob += b" " * (-len(blob) % 8)
    return len(blob).to_bytes(8, "little") + blob + data[8 + n:]


def test_results_round_trip_bit_exactly(content, concept):
    for kind, result in (("content", content), ("concept", concept)):
        data = result_bytes(kind, Stored(result, {"cache_key": "k" * 64, "seconds": 1.5}))
        back = load_result(kind, data, key="k" * 64)
        assert back.provenance == {"cache_key": "k" * 64, "seconds": 1.5}
        assert back.result.config == result.config and back.result.stats == result.stats
        for name in ("vectors",) if kind == "concept" else ("x_T", "embeddings"):
            assert torch.equal(getattr(back.result, name), getattr(result, name)), name
        assert result_bytes(kind, back) == data


def test_a_lean_content_entry_stores_and_loads_without_trajectories(content):
    """What the job layer stores by default (no keep_trajectories): x_T, the embeddings and the
    reconstruction fusion's B* replays, not the inversion latents; an entry without the
    reconstruction is refused."""
    import dataclasses

    from safetensors.torch import load

    lean = dataclasses.replace(content, inversion_latents=None)
    data = result_bytes("content", Stored(lean, {}))
    assert set(load(data)) == {"x_T", "embeddings", "reconstruction"}
    back = load_result("content", data).result
    assert back.inversion_latents is None
    assert torch.equal(back.x_T, content.x_T) and torch.equal(back.embeddings, content.embeddings)
    assert torch.equal(back.reconstruction, content.reconstruction)
    full = result_bytes("content", Stored(content, {}))
    assert set(load(full)) == {"x_T", "embeddings", "inversion_latents", "reconstruction"}
    assert len(data) < len(full)
    # an entry of the format before fusion replayed the fit: no reconstruction
    old = encode("content", {"x_T": content.x_T, "embeddings": content.embeddings},
                 {"provenance": {}, "config": to_dict(content.config),
                  "stats": dataclasses.asdict(content.stats)})
    with pytest.raises(ArtifactError, match="do not match"):
        load_result("content", old)


def test_header_records_what_made_it(content):
    fields = _header(result_bytes("content", Stored(content, {"model": "m"})))["fields"]
    assert fields["config"]["guidance_scale"] == 7.5
    assert fields["config"]["num_inference_steps"] == 6 and len(fields["stats"]["timesteps"]) == 6
    assert fields["config"]["inversion_prompt"] == ""
    assert fields["provenance"] == {"model": "m"}


def test_bad_files_are_refused(content, concept):
    good = result_bytes("content", Stored(content, {}))
    data = bytearray(good)
    data[-5] ^= 0xFF  # flip bits inside the tensor payload
    with pytest.raises(ArtifactError, match="checksum"):
        load_result("content", bytes(data))
    with pytest.raises(ArtifactError, match="expected a content result"):
        load_result("content", result_bytes("concept", Stored(concept, {})))
    with pytest.raises(ArtifactError, match="not a vct result"):
        load_result("concept", b"garbage")
    with pytest.raises(ArtifactError, match="cache_key"):
        load_result("concept", result_bytes("concept", Stored(concept, {"cache_key": "a"})),
                    key="other")


def test_an_edited_header_field_fails_the_checksum(content):
    """The guidance scale drives fusion: editing it in a header must reject the entry."""
    data = result_bytes("content", Stored(content, {}))
    assert load_result("content", _rewrite_header(data, lambda h: None)).result.config \
        .guidance_scale == 7.5

    def edit(header):
        header["fields"]["config"]["guidance_scale"] = 7.9

    with pytest.raises(ArtifactError, match="checksum"):
        load_result("content", _rewrite_header(data, edit))


def test_exported_embedding_loads_into_a_diffusers_pipeline(tiny_model_dir, concept, tmp_path):
    from diffusers import StableDiffusionPipeline

    path = tmp_path / "concept.safetensors"
    path.write_bytes(textual_inversion_bytes(concept, token="<s2>"))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, local_files_only=True,
                                                   safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(str(path), token="<s2>")
    ids = pipe.tokenizer.convert_tokens_to_ids(["<s2>", "<s2>_1", "<s2>_2"])
    table = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(table[ids].detach(), concept.vectors)
    out = pipe("a <s2> painting", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 64, 64, 3)
