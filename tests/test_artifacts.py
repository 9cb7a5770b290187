"""Stage results on disk: bit-exact round trips, verification, textual-inversion export."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from vct.artifacts import ArtifactError, ConceptResult, ContentResult, textual_inversion_bytes
from vct.concept import learn_concept
from vct.config import ConceptConfig, ContentConfig
from vct.content import invert_content


@pytest.fixture(scope="module")
def content(models, images):
    return invert_content(models, Image.open(images["src_b"]).convert("RGB"),
                          ContentConfig(num_inference_steps=6, num_inner_steps=2))


@pytest.fixture(scope="module")
def concept(models, images):
    return learn_concept(models, Image.open(images["ref"]).convert("RGB"),
                         ConceptConfig(max_train_steps=2, batch_microsteps=True))


def test_results_round_trip_bit_exactly(content, concept):
    for result in (content, concept):
        data = result.to_bytes()
        back = type(result).from_bytes(data)
        assert back.meta == json.loads(json.dumps(result.meta))
        for name, tensor in result.tensors().items():
            assert torch.equal(getattr(back, name), tensor), name
        assert back.to_bytes() == data


def test_header_records_what_made_it(content):
    meta = ContentResult.from_bytes(content.to_bytes()).meta
    assert meta["config"]["guidance_scale"] == 7.5
    assert meta["num_inference_steps"] == 6 and len(meta["timesteps"]) == 6
    assert meta["inversion_prompt"] == ""
    assert len(meta["model_identity"]) == 64


def test_bad_files_are_refused(content, concept):
    data = bytearray(content.to_bytes())
    data[-5] ^= 0xFF  # flip bits inside the tensor payload
    with pytest.raises(ArtifactError, match="checksum"):
        ContentResult.from_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="expected a content result"):
        ContentResult.from_bytes(concept.to_bytes())
    with pytest.raises(ArtifactError, match="not a vct result"):
        ConceptResult.from_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="cache_key"):
        ConceptResult.from_bytes(concept.to_bytes(), expect={"cache_key": "other"})


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
