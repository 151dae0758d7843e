"""Training the anchor generator on tiny configs: teacher, LoRA (save / load / fuse), progressive
distillation, the CLI and the benchmark's --tiny run."""
import argparse
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from engine import anchors as A
from engine.anchor_store import read_anchor_store
from engine.fingerprints import LORA_FILE
from tests.test_anchors import TINY, TinyText, tiny_folder
from training import generator as G


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """A 6-video collection on disk: 3 frames of 16 px each, 2 captions per video."""
    root = tmp_path_factory.mktemp("data")
    col = root / "mini"
    (col / "ImageData").mkdir(parents=True)
    (col / "TextData").mkdir()
    colours = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 255, 0)}
    lines = []
    for v in range(6):
        name = list(colours)[v % 3]
        for f in range(3):
            img = np.zeros((16, 16, 3), np.uint8)
            img[4 + f:10 + f, 2 + v:8 + v] = colours[name]
            Image.fromarray(img).save(col / "ImageData" / f"video{v}_{f}.png")
        lines += [f"video{v}#enc#0 a {name} square", f"video{v}#enc#1 a small {name} square moves down"]
    (col / "TextData" / "minitrain.caption.txt").write_text("\n".join(lines) + "\n")
    return root


def test_key_frames_and_pairs(collection):
    from engine.datasets import Collection

    col = Collection(collection, "mini")
    paths = G.key_frame_paths(col, ["video0", "video3"])
    assert [p.name for p in paths] == ["video0_1.png", "video3_1.png"]  # the middle of 3 frames
    prompts, videos, vids = G.training_pairs(col, "train", "both", 8)
    assert len(prompts) == 12 + 6 and vids[0] == "video0" and videos[-1] == 5
    with pytest.raises(A.AnchorError, match="prompt"):
        G.training_pairs(col, "train", "poem", 8)


def test_train_teacher_writes_checkpoint_and_grid(collection, tmp_path):
    cfg = G.TeacherConfig(root=str(collection), out=str(tmp_path / "teacher"), collection="mini", iterations=3,
                          batch_size=4, checkpoint_every=2, grid_prompts=3, grid_steps=2,
                          generator=A.BuiltinConfig(**TINY))
    summary = G.train_teacher(cfg, encoder=TinyText(), progress=False)
    assert summary["iterations"] == 3 and np.isfinite(summary["loss"])
    grids = sorted(p.name for p in (tmp_path / "teacher" / "samples").glob("*.png"))
    assert grids == ["step000002.png", "step000003.png"]  # kept across checkpoints
    info = json.loads((tmp_path / "teacher" / "config.json").read_text())["info"]
    assert info["iterations"] == 3 and info["pairs"] == 18
    gen = A.AnchorGenerator.load(tmp_path / "teacher", device="cpu", text_encoder=TinyText())
    assert gen.generate(["a red square"]).shape == (1, 8, 8, 3)


def test_lora_save_load_fuse_reproduces(collection, tmp_path):
    base, _, _ = tiny_folder(tmp_path)
    cfg = G.LoraTrainConfig(base=str(base), root=str(collection), out=str(tmp_path / "lora"), collection="mini",
                            rank=4, iterations=3, batch_size=4, lr=1e-2)
    summary = G.train_lora(cfg, encoder=TinyText(), progress=False)
    assert summary["trainable_parameters"] > 0 and (tmp_path / "lora" / LORA_FILE).is_file()
    # The unfused peft model, rebuilt from the file, vs the fused generator.
    from diffusers import FluxPipeline

    keys = FluxPipeline.lora_state_dict(str(tmp_path / "lora"))
    keys = keys[0] if isinstance(keys, tuple) else keys
    assert all(k.startswith("transformer.") for k in keys)
    assert any("proj_mlp" in k for k in keys) and any("add_q_proj" in k for k in keys)
    text = TinyText()
    plain = A.AnchorGenerator.load(base, device="cpu", text_encoder=text)
    unfused = A.load_builtin_transformer(base)
    unfused.load_lora_adapter(str(tmp_path / "lora" / LORA_FILE), adapter_name="a", prefix="transformer")
    fused = A.AnchorGenerator.load(base, A.GeneratorOptions(adapters=[(str(tmp_path / "lora"), 1.0)]), device="cpu",
                                   text_encoder=text)
    assert not any("lora" in n for n, _ in fused.backend.transformer.named_parameters())
    cond = fused.backend.encode_prompt(["a red square", "blue"])
    noise = fused.backend.noise([1, 2])
    ids = A.image_ids(4, 4)
    with torch.no_grad():
        v_fused = A.flux_velocity(fused.backend.transformer, noise, torch.tensor([0.7, 0.3]), cond, ids)
        v_lora = A.flux_velocity(unfused.eval(), noise, torch.tensor([0.7, 0.3]), cond, ids)
        v_base = A.flux_velocity(plain.backend.transformer, noise, torch.tensor([0.7, 0.3]), cond, ids)
    assert torch.allclose(v_fused, v_lora, atol=1e-5)
    assert (v_fused - v_base).abs().max() > 1e-4  # the adapter does something
    assert fused.adapter_id != plain.adapter_id


def test_progressive_distillation(collection, tmp_path):
    from training.distill import DistillConfig, distill, two_step_target

    teacher, model, _ = tiny_folder(tmp_path)
    cfg = DistillConfig(teacher=str(teacher), out=str(tmp_path / "students"), steps=[2, 1], start_steps=4,
                        iterations=2, batch_size=4, root=str(collection), collection="mini")
    assert cfg.stages() == [2, 1]
    summary = distill(cfg, encoder=TinyText(), progress=False)
    assert [s["steps"] for s in summary["stages"]] == [2, 1]
    for n in (2, 1):
        gcfg, info = A.read_builtin_config(tmp_path / "students" / f"{n}step")
        assert gcfg.default_steps == n and "progressive" in info["method"]
    # The target is exactly two Euler half-steps of the teacher.
    cond = A.Conditioning(torch.randn(1, 2, 16), torch.ones(1, 2, dtype=torch.bool), torch.randn(1, 16))
    x, ids = torch.randn(1, 4, 48), A.image_ids(4, 4)
    s, s1 = torch.tensor([1.0]), torch.tensor([0.5])
    v = two_step_target(model.eval(), x, s, s1, cond, ids)
    ref = A.euler_sample(model, x, cond, 2, ids)  # the 2-step sampler over [1, 0.5, 0] ...
    half = x + (s1 - s) * v  # ... lands where the target's single step from 1 to 0.5 would, via 0.75
    mid = x - 0.25 * A.flux_velocity(model, x, s, cond, ids)
    twice = mid - 0.25 * A.flux_velocity(model, mid, torch.tensor([0.75]), cond, ids)
    assert torch.allclose(half, twice, atol=1e-5) and ref.shape == x.shape
    for bad, msg in ((dict(steps=[3]), "halving"), (dict(root=None), "root"), (dict(steps=[0]), ">= 1")):
        with pytest.raises(A.AnchorError, match=msg):
            DistillConfig(**{**dict(teacher="t", out="o", root="r"), **bad}).stages()


def test_distillation_with_edge_weight_changes_the_loss_and_records_it(collection, tmp_path):
    """--edge-weight in distillation: same draws as the plain run, another loss, in the recipe only when used."""
    from training.distill import DistillConfig, distill

    teacher, _, _ = tiny_folder(tmp_path)
    runs = {}
    for name, weight in (("plain", 0.0), ("edge", 4.0)):
        cfg = DistillConfig(teacher=str(teacher), out=str(tmp_path / name), steps=[2], start_steps=4, iterations=2,
                            batch_size=4, root=str(collection), collection="mini", edge_weight=weight)
        runs[name] = distill(cfg, encoder=TinyText(), progress=False)["stages"][0]["loss"]
        recipe = A.read_builtin_config(tmp_path / name / "2step")[1]["recipe"]
        assert recipe.get("edge_weight") == (weight or None)
    assert runs["edge"] > runs["plain"]  # the frames' square outlines weigh 1 + 4
    with pytest.raises(A.AnchorError, match="--edge-weight must be >= 0"):
        DistillConfig(teacher="t", out="o", root="r", edge_weight=-1).stages()


def test_shape_guided_velocity_matches_separate_passes():
    """v_u + g (v_c - v_u) + w (v_c - mean_j v_j), from one joint batch, equals the formula over separate
    transformer calls (odd batch, different text lengths, masked padding); w = 0 is plain guidance."""
    from training.shape_negatives import shape_guided_velocity

    torch.manual_seed(0)
    model = A.build_transformer(A.BuiltinConfig(**TINY)).eval()
    b, ids = 3, A.image_ids(4, 4)
    x, sigma = torch.randn(b, 4, 48), torch.rand(b)

    def conditioning(rows, length):
        mask = torch.ones(rows, length, dtype=torch.bool)
        mask[0, length - 1:] = False  # one padded token
        return A.Conditioning(torch.randn(rows, length, 16), mask, torch.randn(rows, 16))

    cond, negatives = conditioning(b, 4), conditioning(2 * b, 6)
    with torch.no_grad():
        v_c = A.flux_velocity(model, x, sigma, cond, ids)
        v_u = A.flux_velocity(model, x, sigma, A.null_conditioning(cond), ids)
        v_n = [A.flux_velocity(model, x, sigma, negatives.index(slice(j * b, (j + 1) * b)), ids) for j in range(2)]
        ref = v_u + 3.0 * (v_c - v_u) + 2.5 * (v_c - 0.5 * (v_n[0] + v_n[1]))
        got = shape_guided_velocity(model, x, sigma, cond, ids, 3.0, negatives, 2.5)
        plain = shape_guided_velocity(model, x, sigma, cond, ids, 3.0, negatives, 0.0)
        assert torch.allclose(got, ref, atol=1e-5)
        assert torch.allclose(plain, A.guided_velocity(model, x, sigma, cond, ids, 3.0), atol=1e-5)
        with pytest.raises(ValueError, match="blocks of 3 rows"):
            shape_guided_velocity(model, x, sigma, cond, ids, 3.0, conditioning(4, 4), 1.0)


def test_swapped_captions_swap_a_shape_or_keep_the_caption():
    from training.shape_negatives import shape_mentions, swapped_captions
    from training.transfer_data import TransferSpec

    vocab = TransferSpec().vocabulary()
    prompts = ["a small red circle moves up on a black background", "a blue thing on grey"]
    lists = swapped_captions(prompts, vocab, 3, torch.Generator().manual_seed(0))
    assert len(lists) == 3 and all(len(texts) == 2 for texts in lists)
    for texts in lists:
        assert [m[2] for m in shape_mentions(texts[0], vocab)] != ["circle"]  # another shape, same grammar
        assert texts[0].endswith("moves up on a black background") and texts[1] == prompts[1]  # nothing to swap


def test_distillation_with_shape_guidance_changes_targets_and_records_it(collection, tmp_path):
    """--shape-guidance: another first-stage target (the tiny captions name squares), in the recipe and method
    only when used; bad values are refused; the CLI passes it through."""
    from training.distill import DistillConfig, distill

    torch.manual_seed(0)
    gcfg = A.BuiltinConfig(**{**TINY, "guidance_scale": 2.0})
    teacher = A.save_builtin(tmp_path / "teacher", A.build_transformer(gcfg).eval(), gcfg, {})
    losses = {}
    for name, weight in (("plain", 0.0), ("shape", 3.0)):
        cfg = DistillConfig(teacher=str(teacher), out=str(tmp_path / name), steps=[2], start_steps=4, iterations=2,
                            batch_size=4, root=str(collection), collection="mini", shape_guidance=weight)
        losses[name] = distill(cfg, encoder=TinyText(), progress=False)["stages"][0]["loss"]
        info = A.read_builtin_config(tmp_path / name / "2step")[1]
        assert info["recipe"].get("shape_guidance") == (weight or None)
        assert info["recipe"].get("shape_swaps") == (2 if weight else None)
        assert ("shape-contrastive" in info["method"]) == bool(weight)
    assert losses["shape"] != losses["plain"]
    for bad, msg in ((dict(shape_guidance=-1), "--shape-guidance must be >= 0"),
                     (dict(shape_guidance=1, shape_swaps=0), "--shape-swaps must be >= 1")):
        with pytest.raises(A.AnchorError, match=msg):
            DistillConfig(teacher="t", out="o", root="r", **bad).stages()
    args = _parser().parse_args(["generator", "distill", "--teacher", "t", "--out", "o", "--shape-guidance", "4",
                                 "--shape-swaps", "3"])
    assert args.shape_guidance == 4.0 and args.shape_swaps == 3


def _parser():
    from engine.cli.generator import add_anchors_command, add_generator_commands

    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command", required=True)
    add_generator_commands(sub)
    add_anchors_command(sub)
    return p


def test_cli_errors_are_one_line(tmp_path, collection):
    p = _parser()
    cases = [
        (["generator", "train", "--root", str(tmp_path), "--collection", "nope", "--out", "x"], "collection"),
        (["generator", "lora", "--base", str(tmp_path / "none"), "--root", str(collection), "--out", "x"], "base"),
        (["generator", "distill", "--teacher", str(tmp_path / "none"), "--out", "x"], "teacher"),
        (["anchors", "--generator", str(tmp_path / "none"), "--root", str(collection), "--out", "x"], "generator"),
    ]
    for argv, word in cases:
        args = p.parse_args(argv)
        with pytest.raises(ValueError, match=word):
            args.func(args)
    teacher, _, _ = tiny_folder(tmp_path)
    args = p.parse_args(["anchors", "--generator", str(teacher), "--root", str(collection), "--collection", "mini",
                         "--prompt", "poem", "--out", "x"])
    with pytest.raises(ValueError, match="query"):
        args.func(args)
    with pytest.raises(SystemExit):  # steps < 1 is refused by argparse
        p.parse_args(["generator", "distill", "--teacher", "t", "--out", "o", "--steps", "0"])


def test_cli_anchors_end_to_end(tmp_path, collection, monkeypatch):
    """`cvr anchors` with the SSSS protocol on a tiny generator (the text encoder stubbed)."""
    teacher, _, _ = tiny_folder(tmp_path)
    monkeypatch.setattr(A.BuiltinFluxPipeline, "text_encoder", property(lambda self: TinyText()))
    args = _parser().parse_args([
        "anchors", "--generator", str(teacher), "--root", str(collection), "--collection", "mini", "--split",
        "train", "--prompt", "ssss", "--steps", "2", "--out", str(tmp_path / "store"), "--vision-weights", "random",
        "--png", str(tmp_path / "png"), "--quiet"])
    monkeypatch.setattr(TinyText, "tokenizer", lambda self, t: {"input_ids": t.split()}, raising=False)
    assert args.func(args) == 0
    ids, regions, meta = read_anchor_store(tmp_path / "store")
    assert ids == [f"video{v}" for v in range(6)] and regions.shape == (6, 4, 2048)
    assert meta["protocol"] == "ssss" and meta["steps"] == 2 and meta["image_size"] == 64


def test_bench_tiny(tmp_path):
    from bench.generator import main

    assert main(["--tiny", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "generator_bench.md").read_text()
    assert "| teacher | 28 |" in table and "student-4step" in table
    result = json.loads((tmp_path / "generator_bench.json").read_text())
    assert {r["steps"] for r in result["rows"]} == {1, 2, 4, 8, 28}
    assert (tmp_path / "generator_steps.png").is_file()


def test_bench_samples_a_guided_teacher_at_its_guidance(tmp_path):
    """A teacher that records guidance g is timed and drawn as it samples (v_u + g (v_c - v_u)), not
    unguided; the students (which record 1) stay one pass per step."""
    from bench.generator import Sampler, _tiny, run

    teacher, students, prompts, encoder = _tiny(tmp_path / "g", guidance=3.0)
    result = run(teacher, students, prompts, tmp_path / "out", encoder=encoder, repeats=1, n_distance=4, batch=2,
                 grid_prompts=2)
    assert {(r["model"], r["guidance"]) for r in result["rows"]} == {("teacher", 3.0), ("student-4step", 1.0)}
    assert "classifier-free guidance 3" in (tmp_path / "out" / "generator_bench.md").read_text()
    config, _ = A.read_builtin_config(teacher)
    pipe = A.BuiltinFluxPipeline(A.load_builtin_transformer(teacher), config, text_encoder=encoder)
    cond = pipe.encode_prompt(prompts[:2])
    guided = Sampler(pipe.transformer, config)(cond, [5, 6], 4)
    assert np.array_equal(guided, pipe(cond=cond, steps=4, seeds=[5, 6]))  # what the engine draws
    unguided = Sampler(pipe.transformer, dataclasses.replace(config, guidance_scale=1.0))
    assert not np.array_equal(guided, unguided(cond, [5, 6], 4))


def test_bench_downstream_hook(tmp_path):
    from bench.generator import _tiny, run

    teacher, students, prompts, encoder = _tiny(tmp_path)
    seen = []

    def downstream(generate):
        images = generate(prompts[:3])
        seen.append(images.shape)
        return 0.5

    result = run(teacher, students, prompts, tmp_path / "out", encoder=encoder, downstream=downstream, repeats=1,
                 n_distance=4, batch=2, grid_prompts=2)
    assert seen == [(3, 8, 8, 3)] * 6 and all(r["r_at_1"] == 0.5 for r in result["rows"])
    assert "| 0.5 |" in (tmp_path / "out" / "generator_bench.md").read_text()


def test_bench_r1_column_from_evaluation_files(tmp_path):
    from bench.generator import _tiny, read_r1, run

    evaluation = tmp_path / "eval_teacher28.json"
    evaluation.write_text(json.dumps({"metrics": {"t2v_r1": 61.234}}))
    measured = read_r1([f"teacher@28={evaluation}"])
    assert measured == {"teacher@28": 61.2}
    second_seed = tmp_path / "eval_teacher28_s1.json"
    second_seed.write_text(json.dumps({"metrics": {"t2v_r1": 63.0}}))
    assert read_r1([f"teacher@28={evaluation},{second_seed}"]) == {"teacher@28": 62.1}  # mean over seeds
    teacher, students, prompts, encoder = _tiny(tmp_path)
    result = run(teacher, students, prompts, tmp_path / "out", encoder=encoder, repeats=1, n_distance=4, batch=2,
                 grid_prompts=2, measured_r1=measured)
    by_row = {(r["model"], r["steps"]): r["r_at_1"] for r in result["rows"]}
    assert by_row[("teacher", 28)] == 61.2 and by_row[("student-4step", 4)] is None
    assert "| 61.2 |" in (tmp_path / "out" / "generator_bench.md").read_text()
    with pytest.raises(SystemExit, match="MODEL@STEPS"):
        read_r1(["teacher28.json"])
    with pytest.raises(SystemExit, match="cannot read"):
        read_r1([f"teacher@28={tmp_path / 'missing.json'}"])


def test_bench_refill_joins_measured_r1_to_an_earlier_run(tmp_path):
    from bench.generator import main

    assert main(["--tiny", "--out", str(tmp_path)]) == 0
    before = json.loads((tmp_path / "generator_bench.json").read_text())
    evaluation = tmp_path / "eval.json"
    evaluation.write_text(json.dumps({"metrics": {"t2v_r1": 42.04}}))
    assert main(["--refill", str(tmp_path), "--downstream", f"student-4step@4={evaluation}"]) == 0
    after = json.loads((tmp_path / "generator_bench.json").read_text())
    rows = {(r["model"], r["steps"]): r for r in after["rows"]}
    assert rows[("student-4step", 4)]["r_at_1"] == 42.0 and rows[("teacher", 28)]["r_at_1"] is None
    assert [r["ms_b1"] for r in after["rows"]] == [r["ms_b1"] for r in before["rows"]]  # timings kept
    assert "| 42.0 |" in (tmp_path / "generator_bench.md").read_text()


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance, resumable training, guidance distillation (issue 17)


def _teacher_cfg(collection, out, **kw):
    base = dict(root=str(collection), out=str(out), collection="mini", iterations=4, batch_size=4,
                checkpoint_every=2, grid_prompts=2, grid_steps=2, generator=A.BuiltinConfig(**TINY))
    return G.TeacherConfig(**{**base, **kw})


def _digest(state: dict) -> str:
    import hashlib

    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].numpy().tobytes())
    return h.hexdigest()[:16]


def test_cond_dropout_zero_is_the_recipe_of_before(collection, tmp_path, monkeypatch):
    """--cond-dropout 0 trains the weights the code before guidance trained, which had no dropout
    step at all: bit for bit the run with that step removed (on any machine; a hard-coded digest
    held only on the CPU it was taken on). And p = 0 draws no random number."""
    G.train_teacher(_teacher_cfg(collection, tmp_path / "t"), encoder=TinyText(), progress=False)
    monkeypatch.setattr(G, "drop_conditioning", lambda cond, p, generator: cond)  # the code of before
    G.train_teacher(_teacher_cfg(collection, tmp_path / "before"), encoder=TinyText(), progress=False)
    monkeypatch.undo()
    trained = A.load_builtin_transformer(tmp_path / "t").state_dict()
    assert _digest(trained) == _digest(A.load_builtin_transformer(tmp_path / "before").state_dict())
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    assert "guidance_scale" not in config["generator"] and "cond_dropout" not in config["info"]["recipe"]
    cond = A.Conditioning(torch.randn(3, 2, 16), torch.ones(3, 2, dtype=torch.bool), torch.randn(3, 16))
    gen = torch.Generator().manual_seed(5)
    state = gen.get_state()
    assert A.drop_conditioning(cond, 0.0, gen) is cond and torch.equal(gen.get_state(), state)
    dropped = A.drop_conditioning(cond, 0.999, gen)
    assert not dropped.mask.any() and not dropped.tokens.any() and not dropped.pooled.any()


def test_resume_equals_one_run(collection, tmp_path):
    """4 iterations in one go == 2, a stop, and 2 more with --resume: bit for bit (model, EMA,
    optimizer and RNG state are restored exactly), with caption dropout on so the RNG matters."""
    kw = dict(cond_dropout=0.3, iterations=4, checkpoint_every=2)
    one = G.train_teacher(_teacher_cfg(collection, tmp_path / "one", **kw), encoder=TinyText(), progress=False)
    G.train_teacher(_teacher_cfg(collection, tmp_path / "two", stop_after=2, **kw), encoder=TinyText(), progress=False)
    state = json.loads((tmp_path / "two" / G.STATE_DIR / "state.json").read_text())
    assert state["step"] == 2 and json.loads((tmp_path / "two" / "config.json").read_text())["info"]["iterations"] == 2
    two = G.train_teacher(_teacher_cfg(collection, tmp_path / "two", resume=True, **kw), encoder=TinyText(),
                          progress=False)
    assert two["resumed_from"] == 2 and one["loss"] == two["loss"]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "one" / G.STATE_DIR / "state.safetensors"))
    b = load_file(str(tmp_path / "two" / G.STATE_DIR / "state.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _digest(A.load_builtin_transformer(tmp_path / "one").state_dict()) == \
        _digest(A.load_builtin_transformer(tmp_path / "two").state_dict())
    with pytest.raises(A.AnchorError, match="another recipe"):
        G.train_teacher(_teacher_cfg(collection, tmp_path / "two", resume=True, lr=5e-3, **kw), encoder=TinyText(),
                        progress=False)
    with pytest.raises(A.AnchorError, match="cond-dropout"):
        G.train_teacher(_teacher_cfg(collection, tmp_path / "x", generator=A.BuiltinConfig(**TINY, guidance_scale=3.0)),
                        encoder=TinyText(), progress=False)


def _count_passes(transformer):
    batches = []

    def hook(module, args, kwargs, out):
        batches.append(kwargs["hidden_states"].shape[0])

    handle = transformer.register_forward_hook(hook, with_kwargs=True)
    return batches, handle


def test_guided_teacher_distils_into_a_one_pass_student(collection, tmp_path):
    from training.distill import DistillConfig, distill, two_step_target

    torch.manual_seed(0)
    gcfg = A.BuiltinConfig(**{**TINY, "guidance_scale": 3.0})
    model = A.build_transformer(gcfg).eval()
    teacher = A.save_builtin(tmp_path / "teacher", model, gcfg, {})
    cfg = DistillConfig(teacher=str(teacher), out=str(tmp_path / "students"), steps=[2], start_steps=4, iterations=2,
                        batch_size=4, root=str(collection), collection="mini")
    summary = distill(cfg, encoder=TinyText(), progress=False)
    assert summary["stages"][0]["teacher_guidance"] == 3.0
    scfg, info = A.read_builtin_config(tmp_path / "students" / "2step")
    assert scfg.guidance_scale == 1.0 and info["teacher_guidance"] == 3.0 and "guidance-distilled" in info["method"]
    # The guided target is two guided Euler half-steps.
    cond = A.Conditioning(torch.randn(2, 3, 16), torch.ones(2, 3, dtype=torch.bool), torch.randn(2, 16))
    x, ids, s, s1 = torch.randn(2, 4, 48), A.image_ids(4, 4), torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.5])
    with torch.no_grad():
        mid = x - 0.25 * A.guided_velocity(model, x, s, cond, ids, 3.0)
        end = mid - 0.25 * A.guided_velocity(model, mid, torch.tensor([0.75, 0.75]), cond, ids, 3.0)
    assert torch.allclose(two_step_target(model, x, s, s1, cond, ids, 3.0), (end - x) / -0.5, atol=1e-5)
    # Passes per step: the student one conditional pass of batch B, the guided teacher one of 2B.
    prompts = ["a red square", "a blue square moves down", "green"]
    student = A.AnchorGenerator.load(tmp_path / "students" / "2step", device="cpu", text_encoder=TinyText())
    batches, handle = _count_passes(student.backend.transformer)
    student.generate(prompts)
    handle.remove()
    assert batches == [3, 3]  # 2 steps, one pass each
    guided = A.AnchorGenerator.load(teacher, device="cpu", text_encoder=TinyText())
    batches, handle = _count_passes(guided.backend.transformer)
    guided.generate(prompts, steps=2)
    handle.remove()
    assert batches == [6, 6]


def test_cli_guidance_and_resume_flags(collection, tmp_path):
    args = _parser().parse_args(["generator", "train", "--root", str(collection), "--collection", "mini", "--out",
                                 str(tmp_path / "t"), "--cond-dropout", "0.1", "--guidance", "4", "--resume",
                                 "--stop-after", "1", "--text-cache", str(tmp_path / "c.safetensors"), "--heads", "6"])
    assert args.cond_dropout == 0.1 and args.guidance == 4.0 and args.resume and args.stop_after == 1
    assert args.heads == 6 and args.head_dim == 32
    args = _parser().parse_args(["generator", "distill", "--teacher", "t", "--out", "o", "--guidance", "2"])
    assert args.guidance == 2.0


def test_text_cache_is_reused_and_keyed(tmp_path):
    prompts = ["a red square", "blue"]
    path = tmp_path / "cache.safetensors"
    first = G.cached_encode_texts(TinyText(), prompts, str(path), progress=False)
    stamp = path.stat().st_mtime_ns
    again = G.cached_encode_texts(TinyText(), prompts, str(path), progress=False)
    assert path.stat().st_mtime_ns == stamp and torch.equal(first.tokens, again.tokens)
    assert torch.equal(first.mask, again.mask) and again.mask.dtype == torch.bool
    other = G.cached_encode_texts(TinyText(), prompts[:1], str(path), progress=False)  # other prompts: re-encoded
    assert other.tokens.shape[0] == 1


# Shape hard negatives (issue 17, item 0: the teacher read colour from the caption but not shape)


def test_swap_shape_names_an_absent_shape_and_keeps_the_rest():
    from training.shape_negatives import shape_mentions, swap_shape
    from training.transfer_data import TransferSpec

    vocab = TransferSpec().vocabulary()
    caption = "a large crimson star shape moves left and a tiny blue box bounces on a black background"
    assert shape_mentions(caption, vocab) == [(3, 2, "star"), (11, 1, "square")]
    rng = np.random.default_rng(0)
    for _ in range(50):
        swapped = swap_shape(caption, vocab, lambda n: int(rng.integers(n)))
        mentions = shape_mentions(swapped, vocab)
        shapes = [m[2] for m in mentions]
        assert len(shapes) == 2 and len(set(shapes) & {"star", "square"}) == 1  # one object changed
        assert shapes[0] != shapes[1] and swapped.endswith("bounces on a black background")
    assert swap_shape("a disc on white", vocab, lambda n: 0) is None  # no colour word before it
    every = " and ".join(f"a red {s}" for s in vocab.shapes)
    assert swap_shape(every, vocab, lambda n: 0) is None  # no shape left to swap in


def test_flow_loss_with_negatives_matches_a_per_row_reference():
    """The loss is the plain flow loss (same draws) plus weight x the per-row hinge, computed here
    row by row with separate transformer calls; no negatives gives flow_loss itself."""
    from training import shape_negatives as SN

    torch.manual_seed(0)
    config = A.BuiltinConfig(**TINY)
    model = A.build_transformer(config).eval()
    s = config.latent_size
    ids = A.image_ids(s, s)
    x0 = torch.randn(8, (s // 2) ** 2, 4 * config.latent_channels)  # FLUX 2x2 packing
    cond = A.Conditioning(torch.randn(8, 3, 16), torch.ones(8, 3, dtype=torch.bool), torch.randn(8, 16))
    cond.mask[1] = False  # a dropped row: never a candidate
    neg_all = A.Conditioning(torch.randn(8, 5, 16), torch.rand(8, 5) < 0.7, torch.randn(8, 16))
    neg_all.mask[:, 0] = True
    seen = {}

    def negatives(candidates):
        seen["rows"] = candidates
        rows = candidates[::2]  # as if only some captions had a shape to swap
        return rows, neg_all.index(rows)

    with torch.no_grad():
        loss, n = SN.flow_loss_with_negatives(model, x0, cond, ids, torch.Generator().manual_seed(3), negatives, 0.7)
        gen = torch.Generator().manual_seed(3)
        noise = torch.randn(x0.shape, generator=gen)
        sigma = G.logit_normal(8, gen)
        x_sigma, target = A.rectified_flow_pair(x0, noise, sigma)

        def err(i, c):
            v = A.flux_velocity(model, x_sigma[i:i + 1], sigma[i:i + 1], c, ids)
            return float((v - target[i:i + 1]).pow(2).mean())

        pos = [err(i, cond.index([i])) for i in range(8)]
        expected_candidates = [i for i in range(8) if sigma[i] >= SN.MIN_SIGMA and i != 1]
        assert seen["rows"].tolist() == expected_candidates and len(expected_candidates) >= 2
        rows = expected_candidates[::2]
        hinge = sum(max(0.0, SN.MARGIN * pos[r] - err(r, neg_all.index([r]))) for r in rows) / 8
        assert n == len(rows)
        assert float(loss) == pytest.approx(np.mean(pos) + 0.7 * hinge, rel=1e-4, abs=1e-6)
        none, _ = SN.flow_loss_with_negatives(model, x0, cond, ids, torch.Generator().manual_seed(3),
                                              lambda c: (c[:0], None), 0.7)
        plain = G.flow_loss(model, x0, cond, ids, torch.Generator().manual_seed(3))
        assert float(none) == pytest.approx(float(plain), rel=1e-5)


def test_teacher_with_shape_negatives_from_init_resumes_and_records(collection, tmp_path):
    """--shape-negatives from --init: the recipe records both, a resume gives the run in one go bit for
    bit (the swaps draw from the saved generator), and --init refuses another architecture."""
    G.train_teacher(_teacher_cfg(collection, tmp_path / "base", iterations=2), encoder=TinyText(), progress=False)
    kw = dict(shape_negatives=0.5, init=str(tmp_path / "base"), iterations=4, checkpoint_every=2)
    one = G.train_teacher(_teacher_cfg(collection, tmp_path / "one", **kw), encoder=TinyText(), progress=False)
    G.train_teacher(_teacher_cfg(collection, tmp_path / "two", stop_after=2, **kw), encoder=TinyText(), progress=False)
    two = G.train_teacher(_teacher_cfg(collection, tmp_path / "two", resume=True, **kw), encoder=TinyText(),
                          progress=False)
    assert one["loss"] == two["loss"]
    assert _digest(A.load_builtin_transformer(tmp_path / "one").state_dict()) == \
        _digest(A.load_builtin_transformer(tmp_path / "two").state_dict())
    info = json.loads((tmp_path / "one" / "config.json").read_text())["info"]
    assert info["recipe"]["shape_negatives"] == 0.5 and info["recipe"]["init"] == str(tmp_path / "base")
    assert info["init_info"]["iterations"] == 2  # what it continued, kept if --out overwrites --init
    plain = G.train_teacher(_teacher_cfg(collection, tmp_path / "plain", init=str(tmp_path / "base"), iterations=4,
                                         checkpoint_every=2), encoder=TinyText(), progress=False)
    assert plain["loss"] != one["loss"]  # the hinge changed the training
    wider = A.BuiltinConfig(**{**TINY, "num_single_layers": 2})
    with pytest.raises(A.AnchorError, match="another architecture"):
        G.train_teacher(_teacher_cfg(collection, tmp_path / "x", init=str(tmp_path / "base"), generator=wider),
                        encoder=TinyText(), progress=False)
    with pytest.raises(A.AnchorError, match="not a generator folder"):
        G.train_teacher(_teacher_cfg(collection, tmp_path / "y", init=str(tmp_path / "nothing")), encoder=TinyText(),
                        progress=False)


def _edges_ref(image: np.ndarray, step: float) -> np.ndarray:
    """Pixel by pixel: is some 4-neighbour more than ``step`` away in some channel ([-1, 1] scale)?"""
    x = image.astype(np.float64) / 127.5 - 1.0
    h, w, _ = x.shape
    edge = np.zeros((h, w), bool)
    for i in range(h):
        for j in range(w):
            for di, dj in ((0, 1), (1, 0), (0, -1), (-1, 0)):
                a, b = i + di, j + dj
                if 0 <= a < h and 0 <= b < w and np.abs(x[i, j] - x[a, b]).max() > step:
                    edge[i, j] = True
    return edge


def test_edge_weights_match_a_pixel_reference_and_weigh_the_loss():
    """edge_weights, unpacked, is 1 + weight on exactly the pixels the loop reference marks (random
    blocks of odd sizes on a noisy background, fold 2 and 1); weight 0 or all-one weights give the
    plain flow loss; edge rows weigh more when the error sits on them."""
    from engine.anchor_pipeline import images_to_latents
    from engine.portable import pack_latents, unpack_latents
    from training.generator_shared import EDGE_STEP, noisy_batch

    rng = np.random.default_rng(0)
    for fold, size in ((2, 12), (1, 10)):
        images = rng.integers(30, 50, (3, size, size, 3)).astype(np.uint8)  # steps of < 0.5: no edges
        for k in range(3):
            top, left, h, w = rng.integers(0, size - 3, 2).tolist() + rng.integers(1, 5, 2).tolist()
            images[k, top:top + h, left:left + w] = rng.integers(120, 255, 3)
        x0 = pack_latents(images_to_latents(images, fold))
        weights = G.edge_weights(x0, 3.0)
        assert weights.shape == x0.shape
        pixels = torch.nn.functional.pixel_shuffle(unpack_latents(weights, size // fold, size // fold), fold)
        for k in range(3):
            expected = 1.0 + 3.0 * _edges_ref(images[k], EDGE_STEP)
            assert expected.max() == 4.0 and expected.min() == 1.0
            np.testing.assert_array_equal(pixels[k].numpy(), np.broadcast_to(expected, (3, size, size)))
        assert torch.equal(G.edge_weights(x0, 0.0), torch.ones_like(x0))

    torch.manual_seed(0)
    config = A.BuiltinConfig(**TINY)
    model = A.build_transformer(config).eval()
    s = config.latent_size
    ids = A.image_ids(s, s)
    x0 = torch.randn(4, (s // 2) ** 2, 4 * config.latent_channels)
    cond = A.Conditioning(torch.randn(4, 3, 16), torch.ones(4, 3, dtype=torch.bool), torch.randn(4, 16))
    with torch.no_grad():
        def loss(weights=None):
            return float(G.flow_loss(model, x0, cond, ids, torch.Generator().manual_seed(1), weights=weights))

        plain = loss()
        assert loss(torch.ones_like(x0)) == pytest.approx(plain, rel=1e-6)
        doubled = torch.ones_like(x0)
        doubled[:2] = 2.0
        x_sigma, sigma, target = noisy_batch(x0, torch.Generator().manual_seed(1))
        rows = (A.flux_velocity(model, x_sigma, sigma, cond, ids) - target).pow(2).mean((1, 2))
        assert loss(doubled) == pytest.approx(float((2 * rows[:2].sum() + rows[2:].sum()) / 4), rel=1e-5)


def test_teacher_with_edge_weight_records_and_refuses_bad_values(collection, tmp_path):
    """--edge-weight changes the training, is in the recipe (absent when 0) and refuses negatives."""
    plain = G.train_teacher(_teacher_cfg(collection, tmp_path / "plain", iterations=2), encoder=TinyText(),
                            progress=False)
    edged = G.train_teacher(_teacher_cfg(collection, tmp_path / "edge", iterations=2, edge_weight=4.0),
                            encoder=TinyText(), progress=False)
    assert edged["loss"] != plain["loss"]
    assert json.loads((tmp_path / "edge" / "config.json").read_text())["info"]["recipe"]["edge_weight"] == 4.0
    assert "edge_weight" not in json.loads((tmp_path / "plain" / "config.json").read_text())["info"]["recipe"]
    with pytest.raises(A.AnchorError, match="--edge-weight must be >= 0"):
        G.train_teacher(_teacher_cfg(collection, tmp_path / "bad", edge_weight=-1.0), encoder=TinyText(),
                        progress=False)


def test_shape_reading_probe_sees_a_shape_blind_encoder(collection, tmp_path):
    """bench.shape_reading: a random tiny generator reacts to a swapped shape word; an encoder that
    cannot tell shapes apart gives a gap of exactly zero (so the probe can tell 'ignored')."""
    from bench import shape_reading
    from engine.datasets import Collection
    from training.transfer_data import TransferSpec

    folder, _, _ = tiny_folder(tmp_path)
    col = Collection(collection, "mini")
    result = shape_reading.measure(folder, col, pairs=6, encoder=TinyText())
    assert result["pairs"] == 6 and [r["sigma"] for r in result["rows"]] == list(shape_reading.SIGMAS)
    assert all(r["shape gap"] != 0 for r in result["rows"])
    phrases = sorted((p for words in TransferSpec().vocabulary().shapes.values() for p in words), key=len, reverse=True)

    class ShapeBlind(TinyText):
        def __call__(self, texts):
            for phrase in phrases:
                texts = [t.replace(phrase, "thing") for t in texts]
            return super().__call__(texts)

    blind = shape_reading.measure(folder, col, pairs=6, encoder=ShapeBlind())
    assert all(r["shape gap"] == 0 and r["null gap"] != 0 for r in blind["rows"])
    assert "shape gap" in shape_reading.markdown(blind)


def test_direct_distillation_targets_many_teacher_steps(collection, tmp_path):
    """--direct: one stage from start_steps to max(steps), whose target is that many teacher Euler steps
    (the teacher's own sampler over the segment), then halvings; recorded only when used."""
    from training.distill import DistillConfig, distill, segment_target, two_step_target

    torch.manual_seed(0)
    model = A.build_transformer(A.BuiltinConfig(**TINY)).eval()
    cond = A.Conditioning(torch.randn(3, 2, 16), torch.ones(3, 2, dtype=torch.bool), torch.randn(3, 16))
    x, ids = torch.randn(3, 4, 48), A.image_ids(4, 4)
    s, s1 = torch.full((3,), 1.0), torch.full((3,), 0.5)
    v = segment_target(model, x, s, s1, cond, ids, substeps=4)
    with torch.no_grad():
        ref = A.euler_sample(model, x, cond, 8, ids)  # 8 steps over [1, 0]: its first 4 cover [1, 0.5]
        y = x
        for a in (1.0, 0.875, 0.75, 0.625):
            y = y - 0.125 * A.flux_velocity(model, y, torch.full((3,), a), cond, ids)
    assert torch.allclose(x - 0.5 * v, y, atol=1e-5) and ref.shape == y.shape
    assert torch.allclose(segment_target(model, x, s, s1, cond, ids), two_step_target(model, x, s, s1, cond, ids))
    base = dict(teacher="t", out="o", root="r", start_steps=32, direct=True)
    assert DistillConfig(**base, steps=[4]).stages() == [4]
    assert DistillConfig(**base, steps=[4, 1]).stages() == [4, 2, 1]
    with pytest.raises(A.AnchorError, match="multiple of 4"):
        DistillConfig(**{**base, "start_steps": 6}, steps=[4]).stages()
    teacher, _, _ = tiny_folder(tmp_path)
    cfg = DistillConfig(teacher=str(teacher), out=str(tmp_path / "direct"), steps=[1], start_steps=4, iterations=2,
                        batch_size=4, root=str(collection), collection="mini", direct=True)
    summary = distill(cfg, encoder=TinyText(), progress=False)
    assert [(st["steps"], st["teacher_steps"]) for st in summary["stages"]] == [(1, 4)]
    info = A.read_builtin_config(tmp_path / "direct" / "1step")[1]
    assert info["recipe"]["direct"] is True and "direct from 4" in info["method"]
    assert _parser().parse_args(["generator", "distill", "--teacher", "t", "--out", "o", "--direct"]).direct
