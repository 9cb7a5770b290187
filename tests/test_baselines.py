"""The quality benchmark's baselines (vct/baselines.py) on the tiny model, and the benchmark's
own bookkeeping (the pair set, the targets, the doc table)."""

import numpy as np
import pytest
import torch

from benchmarks import quality as Q
from tests.conftest import make_image
from vct import baselines as B
from vct.config import ContentConfig
from vct.content import invert_content
from vct.fusion import decode
from vct.inversion import encode_source
from vct.mini import classifier as C
from vct.mini import data as D
from vct.text import encode_prompt

STEPS = 4


def test_sdedit_start_follows_img2img() -> None:
    assert B.sdedit_start(50, 0.5) == 25
    assert B.sdedit_start(50, 0.8) == 10
    assert B.sdedit_start(50, 1.0) == 0
    assert B.sdedit_start(50, 0.0) == 50
    with pytest.raises(ValueError):
        B.sdedit_start(50, 1.5)


def test_sdedit_strength_zero_is_the_vae_round_trip(models) -> None:
    image = make_image(0)
    states = encode_prompt(models, "stripes")
    out = B.sdedit(models, image, states, 0.0, seed=0, num_steps=STEPS)
    np.testing.assert_array_equal(out, decode(models, encode_source(models, image, None)))


def test_sdedit_moves_away_from_the_source_with_strength(models) -> None:
    image = make_image(1)
    states = encode_prompt(models, "stripes")
    base = decode(models, encode_source(models, image, None)).astype(float)
    low = B.sdedit(models, image, states, 0.25, seed=0, num_steps=STEPS).astype(float)
    high = B.sdedit(models, image, states, 1.0, seed=0, num_steps=STEPS).astype(float)
    assert np.abs(low - base).mean() < np.abs(high - base).mean()


def test_text_to_image_is_seeded_and_uses_the_text(models) -> None:
    a = encode_prompt(models, "stripes")
    b = encode_prompt(models, "dots")
    first = B.text_to_image(models, a, seed=3, num_steps=STEPS)
    np.testing.assert_array_equal(first, B.text_to_image(models, a, seed=3, num_steps=STEPS))
    assert not np.array_equal(first, B.text_to_image(models, a, seed=4, num_steps=STEPS))
    assert not np.array_equal(first, B.text_to_image(models, b, seed=3, num_steps=STEPS))
    two = B.text_to_image(models, torch.cat([a, b]), seed=3, count=2, num_steps=STEPS)
    assert two.shape[0] == 2


def test_pair_set_is_fixed_held_out_and_hard() -> None:
    srcs, refs, pairs = Q.pair_set(8, 3, 8)
    assert len(pairs) == 24 and len(srcs) == 8
    assert (srcs, refs, pairs) == Q.pair_set(8, 3, 8)
    for i, j in pairs:
        assert Q.differs(srcs[i], refs[j])
    assert all(sum(1 for i, _ in pairs if i == k) == 3 for k in range(8))
    training = {D.params_for(i) for i in range(2000)}
    assert not training & set(srcs + refs)  # (params collide only by chance; none here)


def _entry(psnr, ssim, edge, iou):
    return {"mean": {"psnr": psnr, "ssim": ssim, "edge_corr": edge, "mask_iou": iou}}


def test_targets_compare_with_both_strengths() -> None:
    methods = {"vct": _entry(20, 0.8, 0.6, 0.7), "sdedit-0.5": _entry(19, 0.7, 0.9, 0.9),
               "sdedit-0.8": _entry(18, 0.6, 0.5, 0.6)}
    t = Q.targets(methods)
    assert all(v["met"] for v in t.values())
    methods["sdedit-0.8"] = _entry(21, 0.6, 0.65, 0.6)
    t = Q.targets(methods)
    assert not t["ground_truth_psnr"]["met"] and t["ground_truth_ssim"]["met"]
    assert not t["structure_edge_corr"]["met"] and t["structure_mask_iou"]["met"]


def test_doc_table_is_replaced_and_the_prose_kept(tmp_path) -> None:
    doc = tmp_path / "quality.md"
    doc.write_text(f"# Q\n\nintro\n\n{Q.TABLE_START}\nold\n{Q.TABLE_END}\n\nafter\n")
    Q.write_doc_table("| new |", doc)
    Q.write_doc_table("| newer |", doc)
    text = doc.read_text()
    assert "intro" in text and "after" in text and "| newer |" in text
    assert "old" not in text and "| new |" not in text


def test_concept_fidelity_scores_against_the_reference() -> None:
    """Samples that are the references score 1 on every head; samples that are the sources
    (which differ from their references in shape, colour and fill) score 0 on those heads."""
    srcs, refs, pairs = Q.pair_set(2, 3, 4)
    net = C.load()
    as_refs = np.stack([np.asarray(D.render(refs[j])) for _, j in pairs])
    as_srcs = np.stack([np.asarray(D.render(srcs[i])) for i, _ in pairs])
    assert Q.concept_fidelity(net, as_refs, refs, pairs)["all"] == 1.0
    wrong = Q.concept_fidelity(net, as_srcs, refs, pairs)
    assert wrong["shape"] == wrong["color"] == wrong["fill"] == 0.0


def test_caption_content_ablation_reruns_b_star(models) -> None:
    """B* replays the fit's stored reconstruction, so the ablation must rerun it: with the
    fit's own embeddings the rerun is that reconstruction, and with the caption's states it
    is another path from the same x_T, while every c_s is the caption's."""
    cfg = ContentConfig(num_inference_steps=STEPS, num_inner_steps=2)
    content = invert_content(models, make_image(0), cfg)
    again = Q.trajectory_under(models, content, content.embeddings, cfg)
    scale = content.reconstruction.abs().max()
    assert (again - content.reconstruction).abs().max() <= 1e-5 * scale
    src = D.params_for(0)
    ablated = Q.caption_content(models, content, src, cfg)
    caption = encode_prompt(models, D.caption(src)).cpu()
    assert torch.equal(ablated.embeddings, caption.expand(STEPS, -1, -1))
    assert torch.equal(ablated.reconstruction[0], content.x_T[0].cpu())
    assert (ablated.reconstruction[-1] - content.reconstruction[-1]).abs().max() > 1e-3 * scale
