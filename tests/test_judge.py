"""The judge: interface contract, input handling, augmentation, the shipped CNN judge on held-out seeds.

Seed ranges: the shipped judge was trained on seeds >= judge.TRAIN_SEED_START (10,000,000); its
recorded accuracy uses seeds 0..1,999; the tests here use 5,000,000..5,000,199 (unseen by both).
"""
import json

import numpy as np
import pytest
import torch

from cosmiclite import Annotation, load_protocol
from cosmiclite.judge import (
    JUDGE_CONFIG,
    JUDGE_WEIGHTS,
    TRAIN_SEED_START,
    CNNJudge,
    Judge,
    JudgeConfig,
    JudgeNet,
    OracleJudge,
    as_batch,
    load_judge,
)
from cosmiclite.judge_train import Augment

TEST_SEEDS = range(5_000_000, 5_000_200)


@pytest.fixture(scope="module")
def judge():
    return load_judge()


@pytest.fixture(scope="module")
def people():
    from cosmiclite.toyworld import render
    return [render(s) for s in TEST_SEEDS]


def test_shipped_files_are_small_and_documented():
    assert JUDGE_WEIGHTS.is_file() and JUDGE_CONFIG.is_file()
    assert JUDGE_WEIGHTS.stat().st_size < 8 * 2 ** 20
    cfg = json.loads(JUDGE_CONFIG.read_text())
    info = cfg["info"]
    assert info["command"].startswith("cosmiclite train-judge")
    assert info["train_seeds"][0] >= TRAIN_SEED_START
    assert info["heldout_seeds"][1] <= min(TEST_SEEDS)
    assert set(info["heldout"]["per_question"]) == set(cfg["heads"])


def test_judge_contract(judge, people):
    assert isinstance(judge, Judge)
    protocol = load_protocol()
    assert judge.questions and set(judge.questions) <= set(protocol.question_ids)
    out = judge.answer([p.image for p in people[:5]])
    assert len(out) == 5
    for a in out:
        assert set(a) == set(judge.questions)
        Annotation(dict(a))  # every answer dict is a valid annotation (children 'not applicable')


def test_input_forms_agree(judge, people):
    u8 = np.stack([p.image for p in people[:4]])
    a = judge.answer(u8)
    assert judge.answer(list(u8)) == a
    assert judge.answer(torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255) == a
    from PIL import Image
    assert judge.answer([Image.fromarray(x) for x in u8]) == a
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        judge.answer(torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 127.5 - 1)
    with pytest.raises(ValueError, match="RGB"):
        judge.answer(u8[..., :2])
    with pytest.raises(TypeError, match="PIL images"):
        judge.answer("image.png")


def _fresh(judge, people):
    from cosmiclite.metrics import semantic_accuracy
    return semantic_accuracy(judge.answer([p.image for p in people]), [p.annotation for p in people],
                             judge_questions=judge.questions, parents="independent")


def test_recorded_accuracy_is_reproduced_on_fresh_seeds(judge, people):
    """The accuracy written to judge.json (seeds 0..1999) holds on other unseen seeds, per question."""
    recorded = json.loads(JUDGE_CONFIG.read_text())["info"]["heldout"]["per_question"]
    res = _fresh(judge, people)
    assert not res.not_judged   # every question the toy world answers is one the judge answers
    for q in res.questions:
        if q.asked >= 30:
            p = recorded[q.id]
            tol = 3 * (p * (1 - p) / q.asked) ** 0.5 + 0.04
            assert abs(q.accuracy - p) <= tol, (q.id, q.accuracy, p, q.asked)
    assert res.acc_all > 0.5


def test_judge_beats_majority_chance(judge, people):
    """Questions without a parent (a child's accuracy also needs its parent detected, e.g. the bag):
    none significantly below always-the-majority-answer, and on average far above it."""
    protocol = load_protocol()
    res = _fresh(judge, people)
    rows = [q for q in res.questions if q.asked >= 50 and not protocol.question(q.id).requires]
    worse = {q.id: (round(q.accuracy, 3), round(q.chance_majority, 3), q.asked) for q in rows
             if q.accuracy < q.chance_majority - 2 * (q.chance_majority * (1 - q.chance_majority) / q.asked) ** 0.5}
    assert not worse, worse
    assert sum(q.accuracy - q.chance_majority for q in rows) / len(rows) > 0.15


def test_judge_meets_95_percent_per_question(judge, people):
    """The issue's target: >= 95 % on every question over the 2,000 held-out people recorded in judge.json,
    and no question of the suite's 200 other people significantly below it (three binomial standard errors)."""
    recorded = json.loads(JUDGE_CONFIG.read_text())["info"]["heldout"]["per_question"]
    assert min(recorded.values()) >= 0.95, sorted(recorded.items(), key=lambda kv: kv[1])[:5]
    res = _fresh(judge, people)
    low = {q.id: (q.accuracy, q.asked) for q in res.questions
           if q.asked >= 20 and q.accuracy < 0.95 - 3 * (0.95 * 0.05 / q.asked) ** 0.5}
    assert not low, low


def test_blur_and_noise_cost_little(judge, people):
    from cosmiclite.metrics import semantic_accuracy
    clean = _fresh(judge, people[:100])
    x = as_batch([p.image for p in people[:100]], 64)
    x = Augment(blur_p=1.0, noise_p=1.0, resample_p=0, shift=0, gain=0, brightness=0)(x, torch.Generator().manual_seed(1))
    res = semantic_accuracy(judge.answer(x), [p.annotation for p in people[:100]], judge_questions=judge.questions,
                            parents="independent")
    assert res.acc_all >= clean.acc_all - 0.08


def test_missing_weights_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="cosmiclite train-judge"):
        load_judge(tmp_path / "nope.safetensors")


def test_save_load_roundtrip(tmp_path):
    cfg = JudgeConfig(heads={"wear_hat": ["yes", "no"], "hat_color": list(load_protocol().question("hat_color").answers)})
    j = CNNJudge(JudgeNet(cfg), cfg)
    x = torch.rand(3, 3, 64, 64)
    j.save(tmp_path / "j.safetensors")
    j2 = load_judge(tmp_path / "j.safetensors")
    assert j2.questions == ("wear_hat", "hat_color")
    torch.testing.assert_close(j2.logits(x)["hat_color"], j.logits(x)["hat_color"], atol=0.05, rtol=0.05)
    for a in j2.answer(x):  # hat colour only when the judge itself sees a hat
        assert (a["hat_color"] == "not applicable") == (a["wear_hat"] == "no")


def test_shifted_moves_the_image_and_repeats_its_edge():
    from cosmiclite.judge import shifted
    x = torch.zeros(1, 3, 8, 8)
    x[0, :, 3, 5] = 1.0
    x[0, 1, :, 0] = 0.5                              # the left edge column, green
    down_left = shifted(x, 1, -1)
    assert down_left[0, 0, 4, 4] == 1 and down_left[0, 0].sum() == 1
    assert shifted(x, 0, 2)[0, 1, :, :3].eq(0.5).all()   # the gap the shift opens repeats the edge
    assert shifted(x, 0, 0) is x
    assert torch.equal(shifted(shifted(x, 0, 1), 0, -1)[..., :-1], x[..., :-1])


def test_the_judge_averages_its_readings_over_the_shifts(tmp_path, people):
    from cosmiclite.judge import SHIFTS, shifted
    heads = {"wear_hat": ["yes", "no"], "hat_color": list(load_protocol().question("hat_color").answers)}
    torch.manual_seed(0)
    net = JudgeNet(JudgeConfig(heads=heads)).eval()
    one = CNNJudge(net, JudgeConfig(heads=heads, shifts=((0, 0),)))
    five = CNNJudge(net, JudgeConfig(heads=heads))
    assert five.cfg.shifts == SHIFTS and len(SHIFTS) == 5
    x = as_batch([p.image for p in people[:4]], 64)
    with torch.no_grad():
        reads = [net(shifted(x, dy, dx))[0]["hat_color"].log_softmax(1) for dy, dx in SHIFTS]
    torch.testing.assert_close(one.logits(x)["hat_color"], reads[0])
    torch.testing.assert_close(five.logits(x)["hat_color"], torch.stack(reads).mean(0))
    assert not torch.allclose(reads[0], reads[1])          # a 1-pixel shift does change what the net reads
    five.save(tmp_path / "j.safetensors")                  # the shifts travel in judge.json
    assert load_judge(tmp_path / "j.safetensors").cfg.shifts == SHIFTS
    one.save(tmp_path / "one.safetensors")
    assert load_judge(tmp_path / "one.safetensors").cfg.shifts == ((0, 0),)
    with pytest.raises(ValueError, match="shifts"):
        JudgeConfig(heads=heads, shifts=())
    with pytest.raises(ValueError, match="shifts"):
        JudgeConfig(heads=heads, shifts=((0, 40),))


def test_bad_size_error():
    with pytest.raises(ValueError, match="divisible"):
        JudgeConfig(heads={"wear_hat": ["yes", "no"]}, size=50)
    with pytest.raises(ValueError, match="parse_stride"):
        JudgeConfig(heads={"wear_hat": ["yes", "no"]}, parse_stride=8)


def test_fine_parse_stride_reads_regions_at_half_the_side(tmp_path):
    from cosmiclite.judge_train import JudgeTrainConfig, train_judge
    judge, info = train_judge(JudgeTrainConfig(steps=2, batch=8, pool=24, threads=1, eval_seeds=8, parse_stride=2),
                              out=tmp_path / "j.safetensors", progress=False)
    logits, parse = judge.net(torch.rand(2, 3, 64, 64))
    assert parse.shape == (2, 18, 32, 32) and judge.net.coords.shape[-1] == 32
    again = load_judge(tmp_path / "j.safetensors")    # the stride travels in judge.json
    assert again.cfg.parse_stride == 2 and np.isfinite(info["final_loss"])
    x = torch.rand(3, 3, 64, 64)
    torch.testing.assert_close(again.logits(x)["wear_hat"], judge.logits(x)["wear_hat"], atol=0.05, rtol=0.05)  # fp16 file
    # a stride-4 judge continued at stride 2 is widened first and keeps its history
    train_judge(JudgeTrainConfig(steps=1, batch=8, pool=24, threads=1, eval_seeds=8), out=tmp_path / "j4.safetensors",
                progress=False)
    wide, info2 = train_judge(JudgeTrainConfig(steps=1, batch=8, pool=24, threads=1, eval_seeds=8, parse_stride=2,
                                          init=str(tmp_path / "j4.safetensors")), out=None, progress=False)
    assert wide.cfg.parse_stride == 2 and info2["continued_from"]["train"]["steps"] == 1


def test_augment_keeps_range_and_changes_images():
    x = torch.rand(8, 3, 64, 64)
    g = torch.Generator().manual_seed(0)
    y = Augment(blur_p=1.0, noise_p=1.0)(x, g)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert (y - x).abs().mean() > 0.01
    ident = Augment(blur_p=0, noise_p=0, resample_p=0, shift=0, gain=0, brightness=0)(x, g)
    torch.testing.assert_close(ident, x)
    # a VAE hook is applied to its share of the batch
    seen = []
    aug = Augment(blur_p=0, noise_p=0, resample_p=0, shift=0, gain=0, brightness=0,
                  vae=lambda t: (seen.append(len(t)), 1 - t)[1], vae_p=1.0)
    torch.testing.assert_close(aug(x, g), 1 - x)
    assert seen == [8]


def test_oracle_judge_is_a_judge():
    a = Annotation({"wear_hat": "yes", "hat_color": "red"})
    j = OracleJudge([a])
    assert isinstance(j, Judge) and j.answer([None]) == [{"hat_color": "red", "wear_hat": "yes"}]


def test_train_judge_runs_and_reconstructs_only_its_vae_pool(tmp_path):
    from cosmiclite.judge_train import JudgeTrainConfig, train_judge
    seen = []
    aug = Augment(vae=lambda t: (seen.append(len(t)), 1 - t)[1], vae_p=0.5)
    cfg = JudgeTrainConfig(steps=3, batch=8, pool=40, vae_pool=16, threads=1, eval_seeds=10)
    judge, info = train_judge(cfg, aug, out=tmp_path / "j.safetensors", progress=False)
    assert seen == [16]                               # reconstructed once, only the first vae_pool people
    assert info["vae_augmented"] and info["train"]["vae_pool"] == 16
    assert np.isfinite(info["final_loss"]) and 0 <= info["heldout"]["acc_all"] <= 1
    assert json.loads((tmp_path / "j.json").read_text())["info"]["train"]["steps"] == 3
    # continuing needs the same heads
    again, info2 = train_judge(JudgeTrainConfig(steps=1, batch=8, pool=40, threads=1, eval_seeds=10,
                                           init=str(tmp_path / "j.safetensors")), out=None, progress=False)
    assert info2["continued_from"]["train"]["steps"] == 3


def test_finer_widens_a_judge_without_changing_what_it_says(judge, people):
    from cosmiclite.judge import CNNJudge, JudgeConfig, JudgeNet, finer
    torch.manual_seed(0)
    cfg = JudgeConfig(heads=judge.cfg.heads, regions=judge.cfg.regions, size=64)     # a stride-4 judge
    net = JudgeNet(cfg).eval()
    w3, hidden = cfg.widths[3], cfg.hidden
    with torch.no_grad():
        for fc in net.region_fc.values():          # the cells' coordinates are all finer() moves: silence them
            fc.weight[:, hidden + w3:hidden + w3 + 4] = 0
    coarse = CNNJudge(net, cfg)
    wide = finer(coarse)
    assert wide.cfg.parse_stride == 2 and coarse.cfg.parse_stride == 4
    x = as_batch(np.stack([p.image for p in people]), 64)
    with torch.no_grad():
        (l4, parse4), (l2, parse2) = coarse.net(x), wide.net(x)
    torch.testing.assert_close(parse2, torch.nn.functional.interpolate(parse4, scale_factor=2, mode="nearest"))
    for q in l4:                                       # same pooled features and areas: the same answers
        torch.testing.assert_close(l2[q], l4[q], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="parse_stride"):
        finer(wide)


def test_deeper_adds_blocks_without_changing_what_the_judge_says(judge, people, tmp_path):
    from cosmiclite.judge import deeper
    from cosmiclite.judge_train import JudgeTrainConfig, train_judge
    deep = deeper(judge)
    assert deep.cfg.fine_blocks == judge.cfg.fine_blocks + 1 and len(deep.net.refine) == deep.cfg.fine_blocks
    assert sum(p.numel() for p in deep.net.parameters()) > sum(p.numel() for p in judge.net.parameters())
    x = as_batch(np.stack([p.image for p in people[:32]]), 64)
    with torch.no_grad():
        (l0, parse0), (l1, parse1) = judge.net(x), deep.net(x)
    torch.testing.assert_close(parse1, parse0)
    for q in l0:
        torch.testing.assert_close(l1[q], l0[q])
    with pytest.raises(ValueError, match="at least one"):
        deeper(judge, 0)
    # the blocks travel in judge.json; train_judge deepens an --init judge with fewer, then they learn
    deep.save(tmp_path / "d.safetensors")
    assert load_judge(tmp_path / "d.safetensors").cfg.fine_blocks == deep.cfg.fine_blocks
    train_judge(JudgeTrainConfig(steps=1, batch=8, pool=24, threads=1, eval_seeds=8), out=tmp_path / "j.safetensors",
                progress=False)
    grown, info = train_judge(JudgeTrainConfig(steps=2, batch=8, pool=24, threads=1, eval_seeds=8, fine_blocks=2,
                                          init=str(tmp_path / "j.safetensors")), out=None, progress=False)
    assert grown.cfg.fine_blocks == 2 and info["continued_from"]["train"]["fine_blocks"] == 0
    assert all(b.body[-1].weight.abs().sum() > 0 for b in grown.net.refine)   # trained away from zero
    with pytest.raises(ValueError, match="fine_blocks"):
        JudgeConfig(heads={"wear_hat": ["yes", "no"]}, fine_blocks=-1)


def test_train_judge_command_records_the_vae_share_and_blocks(tmp_path):
    from cosmiclite.cli import main
    from cosmiclite.models import TOY_MODEL_DIR
    out = tmp_path / "j.safetensors"
    assert main(["train-judge", "--steps", "1", "--batch", "8", "--pool", "24", "--eval-seeds", "8", "--threads", "1",
                 "--vae", str(TOY_MODEL_DIR / "vae"), "--vae-pool", "8", "--vae-p", "0.3", "--fine-blocks", "1",
                 "--out", str(out)]) == 0
    cfg = json.loads(out.with_suffix(".json").read_text())
    info = cfg["info"]
    assert info["augment"]["vae_p"] == 0.3 and info["vae_augmented"] and cfg["fine_blocks"] == 1
    assert "--vae-pool 8 --vae-p 0.3" in info["command"] and "--fine-blocks 1" in info["command"]


def test_render_pool_is_the_same_people_with_any_number_of_workers():
    from cosmiclite.judge_train import render_pool
    from cosmiclite.toyworld import render
    one = render_pool(500, 2003, workers=1, progress=False)            # two chunks: 2000 + 3
    two = render_pool(500, 2003, workers=2, progress=False)
    assert one[0].shape == (2003, 64, 64, 3) and one[1].shape == (2003, 64, 64)
    np.testing.assert_array_equal(one[0], two[0])
    np.testing.assert_array_equal(one[1], two[1])
    assert [a.answers for a in one[2]] == [a.answers for a in two[2]]
    p = render(2502)                                                     # the last seed, in order
    np.testing.assert_array_equal(one[0][-1], p.image)
    assert one[2][-1].answers == p.annotation.answers


def test_augment_shift_moves_each_image_and_its_labels_alike():
    """The shift is one gather: image i is the replicate-padded image cropped at its own (dy, dx), its labels too."""
    import torch.nn.functional as F
    x, lab = torch.rand(6, 3, 16, 16), torch.rand(6, 5, 16, 16)
    shift_only = Augment(blur_p=0, noise_p=0, resample_p=0, shift=2, gain=0, brightness=0)
    y, l = shift_only(x, torch.Generator().manual_seed(3), lab)
    dx, dy = torch.randint(0, 5, (2, 6), generator=torch.Generator().manual_seed(3)).tolist()  # the same draws
    xp = F.pad(torch.cat([x, lab], 1), (2, 2, 2, 2), mode="replicate")
    for i in range(6):
        crop = xp[i, :, dy[i]:dy[i] + 16, dx[i]:dx[i] + 16]
        assert torch.equal(y[i], crop[:3]) and torch.equal(l[i], crop[3:])
    assert len({(a, b) for a, b in zip(dx, dy)}) > 1        # not one shift for the whole batch
