"""The erase trainer on the shipped sandbox: what it updates, what it freezes, and that it erases."""
import copy
import random

import pytest
import torch

from erase_core.concepts import ConceptSet
from erase_core.evaluate import found_rate
from erase_core.lora import apply_lora, read_lora, save_lora, teacher_mode
from erase_core.sandbox.erase_sets import sandbox_concept_set
from erase_core.tokens import replace_word, shuffle_words, tokenize_with_offsets
from erase_core.train import EraseConfig, Eraser, NonFiniteLoss, erase, scheduled_lr

SMALL = dict(steps=2, batch=4, base_samples=4, preserve_images=1)


def test_config_validates_itself():
    with pytest.raises(ValueError, match="method='uce'"):
        EraseConfig(method="uce")
    with pytest.raises(ValueError, match="t_range"):
        EraseConfig(t_range=(0.8, 0.2))
    with pytest.raises(ValueError, match="rank=0"):
        EraseConfig(rank=0)
    with pytest.raises(ValueError, match="lambda_attn=-1"):
        EraseConfig(lambda_attn=-1)


def test_learning_rate_schedules():
    cos = EraseConfig(lr=0.02, steps=10, lr_schedule="cosine")
    assert [round(scheduled_lr(cos, s), 6) for s in (0, 5)] == [0.02, 0.01]
    assert all(scheduled_lr(cos, s) > scheduled_lr(cos, s + 1) > 0 for s in range(9))
    const = EraseConfig(lr=0.02, steps=10, lr_schedule="constant")
    assert {scheduled_lr(const, s) for s in range(10)} == {0.02}
    warm = EraseConfig(lr=0.02, steps=10, warmup_steps=4)
    assert [scheduled_lr(warm, s) for s in range(5)] == pytest.approx([0.005, 0.01, 0.015, 0.02, 0.02])
    with pytest.raises(ValueError, match="lr_schedule='linear'"):
        EraseConfig(lr_schedule="linear")


def test_esd_negative_and_preserve_target_options(world):
    """At the first step the LoRA is zero, so the student is the base: the teacher-target preserve loss is exactly 0,
    and the ESD loss is (1 + η)² ‖v_c − v_ref‖² with v_ref from the empty prompt or the prompt without the word."""
    with pytest.raises(ValueError, match="esd_negative='none'"):
        EraseConfig(esd_negative="none")
    with pytest.raises(ValueError, match="preserve_target='x'"):
        EraseConfig(preserve_target="x")
    cs = sandbox_concept_set("red")
    for negative in ("empty", "without_concept"):
        er = Eraser(world, cs, EraseConfig(**SMALL, method="esd", eta=0.5, esd_negative=negative))
        seen = []
        orig = er._velocity
        er._velocity = lambda x, t, text, kind: seen.append((x, t, text)) or orig(x, t, text, kind)
        got = er.lower_step()["esd"]
        (x2, t2, both), (_, _, student_text) = seen[0], seen[1]  # the teacher's v_ref and v_c come in one forward
        b = len(x2) // 2
        x, t, ref_text, text = x2[:b], t2[:b], both.select(slice(0, b)), both.select(slice(b, None))
        assert torch.equal(text.sequence, student_text.sequence) and torch.equal(x2[b:], x)
        with torch.no_grad():
            v_ref, v_c = world.backend().velocity(x, t, ref_text), world.backend().velocity(x, t, text)
        assert got == pytest.approx((1.5 ** 2) * torch.mean((v_c - v_ref) ** 2).item(), rel=1e-4)
        if negative == "without_concept":
            assert not torch.allclose(ref_text.sequence[0], world.encode([""]).sequence[0])
        else:
            assert torch.equal(ref_text.sequence[0], world.encode([""]).sequence[0])
    er = Eraser(world, cs, EraseConfig(**SMALL, preserve_target="teacher", lambda_rsc=0.0))
    assert er.upper_step()["preserve"] == 0.0
    er = Eraser(world, cs, EraseConfig(**SMALL, preserve_target="flow", lambda_rsc=0.0))
    assert er.upper_step()["preserve"] > 0.01


def test_lower_step_computes_the_upper_steps_teacher_targets_with_the_same_draws(world):
    """The teacher has no LoRA, so the preserve targets of the next upper step join the lower step's teacher forward;
    the upper step's data are the ones it would have drawn itself, and its targets are the frozen base's."""
    cs = sandbox_concept_set("red")
    er = Eraser(world, cs, EraseConfig(**SMALL))
    er.lower_step()
    pb = er._preserve_batch
    with torch.no_grad(), er.backend.teacher():
        torch.testing.assert_close(pb.v_base, er.backend.velocity(pb.x_t, pb.t, pb.text), atol=1e-5, rtol=1e-4)
    own = Eraser(world, cs, EraseConfig(**SMALL))
    own._upper_pending = lambda: False  # the lower step leaves the upper step's draws to it
    own.lower_step()
    assert own._preserve_batch is None
    mine = own._draw_preserve()
    assert torch.equal(pb.text.sequence, mine.text.sequence) and torch.equal(pb.x0, mine.x0)
    assert torch.equal(pb.noise, mine.noise) and torch.equal(pb.t, mine.t) and mine.v_base is None
    forwards = dict(er.forwards)
    er.upper_step()
    assert er._preserve_batch is None and er.forwards["teacher"] == forwards["teacher"]  # no second teacher pass


def test_chunked_rsc_gives_the_same_gradient(world):
    """rsc_chunk trades one extra no-grad forward for the memory of a chunk; the gradient is the same."""
    cs = sandbox_concept_set("red")
    with pytest.raises(ValueError, match="rsc_chunk=-1"):
        EraseConfig(rsc_chunk=-1)
    grads, values = [], []
    for chunk in (0, 1, 2):
        er = Eraser(world, cs, EraseConfig(**SMALL, lambda_preserve=0.0, rsc_chunk=chunk))
        with torch.no_grad():  # a LoRA that is not zero, so that L_rsc has a gradient everywhere
            for prm in er.params:
                prm.add_(0.05 * torch.randn(prm.shape, generator=torch.Generator().manual_seed(prm.numel())))
        er.opt.step = lambda: None  # keep the gradients, skip the update
        values.append(er.upper_step()["rsc"])
        grads.append([torch.zeros_like(prm) if prm.grad is None else prm.grad.clone() for prm in er.params])
    assert values[1] == pytest.approx(values[0], rel=1e-5) and values[2] == pytest.approx(values[0], rel=1e-5)
    assert sum(g.abs().sum() for g in grads[0]) > 0
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(b, a, atol=1e-7, rtol=1e-4)


def test_beyond_concept_samples_do_not_carry_the_concept_on_the_pooled_path(world):
    """The far-perturbed prompts keep the base's velocity; their pooled vector is the prompt's without the word, or
    the beyond-concept term would preserve the concept through Flux's second (pooled) text path."""
    er = Eraser(world, sandbox_concept_set("red"), EraseConfig(**SMALL, method="eraseanything+neighbors"))
    seen = []
    orig = er._velocity
    er._velocity = lambda x, t, text, kind: seen.append(text) or orig(x, t, text, kind)
    state = er.rng.getstate()
    er._beyond_concept_loss()
    er.rng.setstate(state)
    prompts = [shuffle_words(er.rng.choice(er.concept.prompts), er.rng, keep="red") for _ in range(SMALL["batch"])]
    without = world.encode([replace_word(p, "red", "") for p in prompts])
    assert torch.equal(seen[0].pooled, without.pooled) and torch.equal(seen[1].pooled, without.pooled)
    assert not torch.equal(seen[0].pooled, world.encode(prompts).pooled)


def test_lambda_beyond_weights_or_drops_the_beyond_concept_term(world):
    cs = sandbox_concept_set("red")
    with pytest.raises(ValueError, match="lambda_beyond=-1"):
        EraseConfig(lambda_beyond=-1)
    small = {**SMALL, "method": "eraseanything+neighbors", "lambda_rsc": 0.0}
    assert "beyond" in Eraser(world, cs, EraseConfig(**small)).upper_step()  # default: lambda_preserve
    assert "beyond" not in Eraser(world, cs, EraseConfig(**small, lambda_beyond=0.0)).upper_step()


def test_concept_set_checks_prompts():
    with pytest.raises(ValueError, match="must contain the word 'red'"):
        ConceptSet("red", ("a blue circle",))
    with pytest.raises(ValueError, match="empty"):
        ConceptSet(" ", ("a circle",))
    assert ConceptSet("red", ("a red circle",)).substitute("a Red circle", "") == "a circle"


def test_only_lora_parameters_change_and_teacher_is_the_base(world):
    base_sd = {k: v.clone() for k, v in world.transformer.state_dict().items()}
    er = Eraser(world, sandbox_concept_set("red"), EraseConfig(**SMALL))
    before = {n: p.detach().clone() for n, p in er.model.named_parameters()}
    er.train()
    changed = {n for n, p in er.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert all(p.requires_grad == ("lora_" in n) for n, p in er.model.named_parameters())
    # the world's own model is untouched, and the teacher (LoRA off) equals it exactly
    assert all(torch.equal(v, base_sd[k]) for k, v in world.transformer.state_dict().items())
    x = world.noise(2, 0)
    t = torch.tensor([0.5, 0.9])
    text = world.encode(["a red circle", "a blue star"])
    with torch.no_grad():
        ref = world.backend().velocity(x, t, text)
        with teacher_mode(er.model, er.params):
            teacher = er.backend.velocity(x, t, text)
        student = er.backend.velocity(x, t, text)
    assert torch.equal(teacher, ref)
    assert (student - ref).abs().max() > 0
    assert all(p.requires_grad for p in er.params)


def test_indices_are_recomputed_after_shuffling(world):
    rng = random.Random(0)
    for _ in range(20):
        prompt = shuffle_words("a red circle in the northwest", rng)
        tp = tokenize_with_offsets(world.tokenizer, prompt)
        for word in ("red", "northwest"):
            idx = world.token_indices(prompt, word)
            assert "".join(tp.tokens[i] for i in idx).replace("▁", "") == word


def test_deterministic_under_seed(world):
    a = erase(world, sandbox_concept_set("red"), EraseConfig(**SMALL, seed=3)).model
    b = erase(world, sandbox_concept_set("red"), EraseConfig(**SMALL, seed=3)).model
    pa = {n: p for n, p in a.named_parameters() if "lora_" in n}
    pb = {n: p for n, p in b.named_parameters() if "lora_" in n}
    assert all(torch.equal(pa[n], pb[n]) for n in pa)


def test_nan_stops_with_a_clear_error(world):
    er = Eraser(world, sandbox_concept_set("red"), EraseConfig(**SMALL))
    with torch.no_grad():
        er.params[0].fill_(float("nan"))
        er.params[1].fill_(float("nan"))
    with pytest.raises(NonFiniteLoss, match="lower lr"):
        er.train()


def test_baselines_run_and_count_forwards(world):
    for method in ("esd", "ca"):
        res = erase(world, sandbox_concept_set("circle"), EraseConfig(method=method, **SMALL))
        assert res.forwards["student"] == 2 * 4
        assert set(res.history[-1].losses) == {"esd" if method == "esd" else "ca"}
    res = erase(world, sandbox_concept_set("circle"), EraseConfig(**SMALL))
    assert set(res.history[-1].losses) == {"esd", "attn", "preserve", "rsc"}


def test_progress_carries_losses_and_previews(world):
    logs = []
    erase(world, sandbox_concept_set("red"), EraseConfig(**{**SMALL, "steps": 3}, preview_every=2), progress=logs.append)
    assert [entry.step for entry in logs] == [0, 1, 2]
    assert [entry.lr for entry in logs] == [scheduled_lr(EraseConfig(steps=3), s) for s in range(3)]
    assert {"esd", "attn", "preserve", "rsc"} <= set(logs[0].losses)
    assert logs[0].preview is None and logs[1].preview.shape == (3, 32, 32) and logs[2].preview is not None
    with pytest.raises(ValueError, match="preview_every=-1"):
        EraseConfig(preview_every=-1)


def test_interrupt_stops_early(world):
    calls = []
    res = erase(world, sandbox_concept_set("red"), EraseConfig(**{**SMALL, "steps": 5}),
                should_stop=lambda: len(calls) >= 2, progress=calls.append)
    assert res.interrupted and len(res.history) == 2


def test_saved_lora_reloads_to_identical_outputs(world, tmp_path):
    res = erase(world, sandbox_concept_set("red"), EraseConfig(**SMALL))
    path = save_lora(res.model, tmp_path / "red.safetensors", {"concept": "red"})
    tensors, meta = read_lora(path)
    assert all(k.startswith(("transformer.transformer_blocks.", "transformer.time_text_embed.")) for k in tensors)
    assert any(".add_v_proj." in k for k in tensors) and any("text_embedder" in k for k in tensors)
    assert meta["erase_flux"]["concept"] == "red"
    with pytest.raises(FileExistsError):
        save_lora(res.model, path, {})
    loaded = apply_lora(copy.deepcopy(world.transformer), path)
    x, t = world.noise(2, 1), torch.tensor([0.3, 0.7])
    text = world.encode(["a red circle", "a red star"])
    with torch.no_grad():
        torch.testing.assert_close(world.backend(loaded).velocity(x, t, text),
                                   world.backend(res.model).velocity(x, t, text), rtol=0, atol=1e-6)


def test_short_erase_lowers_acc_e(world):
    cfg = EraseConfig(base_samples=32, preserve_images=4)  # the default erase, with fewer base-model images
    res = erase(world, sandbox_concept_set("red"), cfg)
    before = found_rate(world, "a red shape", "red", 32, seed=99)
    after = found_rate(world, "a red shape", "red", 32, seed=99, transformer=res.model)
    assert before >= 80 and after <= before - 40, (before, after)


def test_interrupt_keeps_a_checkpoint_that_resumes_exactly(world, tmp_path):
    cfg = EraseConfig(**{**SMALL, "steps": 4}, seed=5)
    straight = erase(world, sandbox_concept_set("red"), cfg).model
    ckpt = tmp_path / "erase.ckpt"
    calls = []
    first = erase(world, sandbox_concept_set("red"), cfg, should_stop=lambda: len(calls) >= 2,
                  progress=calls.append, checkpoint_path=ckpt)
    assert first.interrupted and ckpt.exists()
    resumed = Eraser(world, sandbox_concept_set("red"), cfg).train(checkpoint_path=ckpt, resume=True)
    assert [h.step for h in resumed.history] == [2, 3]
    a = {n: p for n, p in straight.named_parameters() if "lora_" in n}
    b = {n: p for n, p in resumed.model.named_parameters() if "lora_" in n}
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)
    with pytest.raises(ValueError, match="another config"):
        Eraser(world, sandbox_concept_set("red"), EraseConfig(**{**SMALL, "steps": 4}, seed=6)).train(
            checkpoint_path=ckpt, resume=True)


def test_cli_erase_then_evaluate(world, tmp_path, capsys):
    import json

    from erase_core.cli import main

    out = tmp_path / "red.safetensors"
    assert main(["erase", "--concept", "crimson", "--steps", "2", "--out", str(out)]) == 0
    assert read_lora(out)[1]["erase_flux"]["concept"] == "red"
    assert main(["erase", "--concept", "red", "--steps", "2", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["evaluate", "--lora", str(out), "--concept", "red", "--samples", "4", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert {"acc_e", "acc_ir", "acc_g", "h_o"} <= set(metrics)
    assert main(["erase", "--concept", "giraffe", "--out", str(tmp_path / "g.safetensors")]) == 2


def test_gradient_checkpointing_gives_the_same_step(world):
    """With diffusers' gradient checkpointing (what real Flux needs), backward re-runs each block: the attention
    patches are re-entered for their own term only, and one outer step lands on the same LoRA as without it."""
    cs = sandbox_concept_set("red")
    cfg = EraseConfig(**{**SMALL, "steps": 1})
    plain = Eraser(world, cs, cfg)
    ckpt = Eraser(world, cs, cfg)
    ckpt.model.enable_gradient_checkpointing()
    ckpt.model.train()
    plain.lower_step(), plain.upper_step()
    ckpt.lower_step(), ckpt.upper_step()
    a = {n: p for n, p in plain.model.named_parameters() if "lora_" in n}
    b = {n: p for n, p in ckpt.model.named_parameters() if "lora_" in n}
    assert a.keys() == b.keys() and any(p.abs().sum() > 0 for n, p in a.items() if "lora_B" in n)
    for n in a:
        assert torch.allclose(a[n], b[n], atol=1e-5), n


def test_synonyms_the_tokenizer_cannot_find_are_dropped_not_fatal(world, caplog):
    """WordNet's automatic synonyms can hold characters the tokenizer maps to <unk> ("blood-red" on the sandbox):
    the trainer drops them with a warning instead of failing mid-training."""
    class NoHyphens:  # ComfyUI's sandbox CLIP rebuilds text from pieces, so <unk> for "-" cannot be matched
        def __getattr__(self, name):
            return getattr(world, name)

        def token_indices(self, prompt, word):
            if "-" in word:
                raise ValueError(f"word {word!r} does not occur in prompt {prompt!r}")
            return world.token_indices(prompt, word)

    cs = ConceptSet("red", ("a red circle",), synonyms=("crimson", "blood-red"), irrelevant=("blue", "x-y"),
                    preserve_prompts=("a blue square",))
    er = Eraser(NoHyphens(), cs, EraseConfig(**SMALL))
    assert er.concept.synonyms == ("crimson",) and er.concept.irrelevant == ("blue",)
    assert "blood-red" in caplog.text
    er.train()


def test_resume_may_change_the_step_count_but_nothing_else(world, tmp_path):
    ckpt = tmp_path / "ck.pt"
    Eraser(world, sandbox_concept_set("red"), EraseConfig(**SMALL)).train(checkpoint_path=ckpt, should_stop=lambda: True)
    longer = Eraser(world, sandbox_concept_set("red"), EraseConfig(**{**SMALL, "steps": 3}))
    assert longer.load_checkpoint(ckpt) == 0
    with pytest.raises(ValueError, match=r"differs in \['lr'\].*only steps, preview_every may change"):
        Eraser(world, sandbox_concept_set("red"), EraseConfig(**{**SMALL, "lr": 0.5})).load_checkpoint(ckpt)


def test_a_progress_hook_that_raises_still_leaves_a_resumable_checkpoint(world, tmp_path):
    """ComfyUI cancels by raising from its progress hook: the finished steps are checkpointed before it propagates."""
    ckpt = tmp_path / "ck.pt"

    def cancel(entry):
        if entry.step == 1:
            raise KeyboardInterrupt

    er = Eraser(world, sandbox_concept_set("red"), EraseConfig(**{**SMALL, "steps": 4}))
    with pytest.raises(KeyboardInterrupt):
        er.train(progress=cancel, checkpoint_path=ckpt)
    assert torch.load(ckpt, weights_only=True)["step"] == 2
