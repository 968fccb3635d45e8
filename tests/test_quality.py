"""Measured sensitivity, loss-based allocation, healing and the quality budget (tiny models)."""

import json

import pytest
import torch
from tiny_models import save_tiny, tiny_model

from eigenkv.cli import main
from eigenkv.exporter.perplexity import kl_divergence
from eigenkv.exporter import ranks as rank_sel
from eigenkv.exporter import sensitivity
from eigenkv.exporter.calibrate import calibrate
from eigenkv.exporter.decoder import decoder_from_hf
from eigenkv.exporter.fold import fold
from eigenkv.exporter.heal import HealSettings, folded_parameters, heal
from eigenkv.exporter.methods import get_method, method_factors


@pytest.fixture(scope="module")
def llama():
    decoder = decoder_from_hf(tiny_model("llama"))
    gen = torch.Generator().manual_seed(7)
    # tokens with structure (a repeated random phrase + noise), so a model can be fitted to them
    phrase = torch.randint(0, 256, (37,), generator=gen)
    stream = phrase.repeat(60)
    noise = torch.rand(stream.shape, generator=gen) < 0.1
    stream = torch.where(noise, torch.randint(0, 256, stream.shape, generator=gen), stream)
    samples = stream[: 8 * 64].view(8, 64)
    stats = calibrate(decoder, samples, progress=False, fisher=True)
    factors = method_factors(get_method("loss-aware"), decoder, stats, "pre", 64)
    return decoder, factors, samples, stream


@torch.no_grad()
def test_sensitivity_probes_and_prediction(llama):
    decoder, factors, samples, _ = llama
    sens = sensitivity.measure(decoder, factors, samples[:4, :32], "pre", progress=False)
    d, n = decoder.dims.head_dim, decoder.dims.n_layers
    assert sens.probe_rank == d // 2 and len(sens.key_kl) == len(sens.value_kl) == n
    # KL >= 0 up to float32 rounding: this tiny model's keys lose next to nothing at d/2 (1e-7 to
    # -2e-9 nats, the float32 floor, by layer and Fisher draws), its values 4e-5 to 8e-5
    assert all(k > -1e-7 for k in sens.key_kl + sens.value_kl)
    assert min(sens.value_kl) > 1e-6
    # probe 0 by hand: fold only layer 0's values at d/2 and compare the KL
    layer_only = fold(decoder, factors, [d] * n, [d // 2] + [d] * (n - 1), "pre")
    ref = torch.log_softmax(decoder(samples[:4, :32]), -1)
    # (full-rank folds of the other layers match the original to ~1e-6, not bit-exactly)
    assert float(kl_divergence(ref, layer_only(samples[:4, :32]))) == pytest.approx(sens.value_kl[0], rel=1e-2)
    keys, values = sens.predicted(factors)
    for curve, kl in zip(keys + values, sens.key_kl + sens.value_kl):
        assert float(curve[d // 2]) == pytest.approx(max(kl, 0.0), rel=1e-9) and float(curve[d]) == 0.0
        assert bool((curve[:-1] >= curve[1:] - 1e-15).all())  # non-increasing in rank
    for ratio in (0.75, 0.5, 0.3):
        kr, vr = rank_sel.allocate(keys, values, ratio)
        assert ratio - 1 / (2 * d * n) < rank_sel.kv_ratio(kr, vr, d) <= ratio + 1e-9
    # probing only some layers (--compress-layers) gives those layers' KLs exactly, None elsewhere
    some = sensitivity.measure(decoder, factors, samples[:4, :32], "pre", progress=False, layers=[n - 1])
    assert some.key_kl[:-1] == some.value_kl[:-1] == [None] * (n - 1)
    assert (some.key_kl[-1], some.value_kl[-1]) == (sens.key_kl[-1], sens.value_kl[-1])
    keys, values = some.predicted(factors)
    assert keys[:-1] == values[:-1] == [None] * (n - 1)
    assert float(keys[-1][d // 2]) == pytest.approx(max(sens.key_kl[-1], 0.0))


def test_healing_lowers_kl_and_trains_only_folded_tensors(llama):
    decoder, factors, samples, stream = llama
    d, n = decoder.dims.head_dim, decoder.dims.n_layers
    folded = fold(decoder, factors, [d // 4] * n, [d // 4] * n, "pre")
    before_orig = {k: v.clone() for k, v in decoder.state_dict().items()}
    shared_before = {k: v.clone() for k, v in folded.state_dict().items() if "attn" not in k}
    # A random tiny model has next to no structure to generalise (held-out gains are measured on
    # the real model, README); here: healing is an optimiser of KL on the text it is given.
    train = stream[: 8 * 64]
    ref = torch.log_softmax(decoder(train.view(8, 64)), -1).detach()
    with torch.no_grad():
        kl_before = float(kl_divergence(ref, folded(train.view(8, 64))))
    report = heal(folded, decoder, train, HealSettings(steps=40, lr=1e-4, batch_size=4, seq_len=64), progress=False)
    with torch.no_grad():
        kl_after = float(kl_divergence(ref, folded(train.view(8, 64))))
    assert report.kl_last < report.kl_first and kl_after < 0.8 * kl_before, (kl_before, kl_after, report)
    assert (report.batch_size, report.seq_len, report.lr) == (4, 64, 1e-4)  # the windows it drew
    assert all(torch.equal(v, decoder.state_dict()[k]) for k, v in before_orig.items())  # the teacher is intact
    assert all(torch.equal(v, folded.state_dict()[k]) for k, v in shared_before.items())
    assert folded.key_ranks == [d // 4] * n and not any(p.requires_grad for p in folded_parameters(folded, decoder))
    assert not any(layer.attn.differentiable for layer in folded.layers)


def test_healing_on_a_mix_draws_by_weight_and_reports_the_held_out_curve(llama):
    """Windows come from each text of the mix by its weight (a text of weight 0 is never drawn: its
    windows would be all-zero ids here, which the training text never has), and the held-out KL curve
    has its first point before any step (= the KL of the untrained fold) and its last after the last."""
    decoder, factors, samples, stream = llama
    d, n = decoder.dims.head_dim, decoder.dims.n_layers
    folded = fold(decoder, factors, [d // 4] * n, [d // 4] * n, "pre")
    held_out = stream[-2 * 64:].view(2, 64)
    with torch.no_grad():
        untrained = float(kl_divergence(torch.log_softmax(decoder(held_out), -1), folded(held_out)))
    seen = []
    original_forward = type(folded).forward

    class Spy(type(folded)):
        def forward(self, ids, *a, **k):
            seen.append(ids.clone())
            return original_forward(self, ids, *a, **k)

    folded.__class__ = Spy
    try:
        report = heal(folded, decoder, {"text": stream[: 8 * 64], "zeros": torch.zeros(256, dtype=torch.int64)},
                      HealSettings(steps=6, lr=1e-4, batch_size=2, seq_len=64, eval_every=2), progress=False,
                      weights={"text": 1.0, "zeros": 0.0}, held_out=held_out)
    finally:
        folded.__class__ = Spy.__mro__[1]
    trained = [ids for ids in seen if ids.shape == (2, 64) and not torch.equal(ids, held_out)]
    assert len(trained) == 6 and not any(bool((ids == 0).all(1).any()) for ids in trained)
    steps = [s for s, _ in report.held_out_kl]
    assert steps == [0, 2, 4, 6] and report.held_out_kl[0][1] == pytest.approx(untrained, rel=1e-5)
    assert report.summary()["held_out_kl"][0] == [0, round(untrained, 5)]


def test_healing_the_query_side_trains_a_private_copy_of_every_query_projection(llama):
    """--heal-query: every layer's q_proj becomes the folded model's own (the copy changes no output),
    trains with the folded tensors, and the teacher's q_proj stays bit-identical."""
    from eigenkv.exporter.heal import own_query_projections
    decoder, factors, samples, stream = llama
    d, n = decoder.dims.head_dim, decoder.dims.n_layers
    folded = fold(decoder, factors, [d // 4] * n, [d // 4] * n, "pre")
    assert all(f.attn.q_proj is o.attn.q_proj for f, o in zip(folded.layers, decoder.layers))  # pre: W_q shared
    q_before = [o.attn.q_proj.weight.clone() for o in decoder.layers]
    n_plain = sum(p.numel() for p in folded_parameters(folded, decoder))
    ids = samples[:2, :48]
    with torch.no_grad():
        out_shared = folded(ids)
        assert own_query_projections(folded, decoder) == n and own_query_projections(folded, decoder) == 0
        assert torch.equal(folded(ids), out_shared)  # a copy: same queries, same logits
    q_params = sum(o.attn.q_proj.weight.numel() + (o.attn.q_proj.bias.numel() if o.attn.q_proj.bias is not None
                                                   else 0) for o in decoder.layers)
    report = heal(folded, decoder, stream[: 8 * 64], HealSettings(steps=5, lr=1e-3, batch_size=2, seq_len=64,
                                                                    query=True), progress=False)
    assert report.query and report.summary()["query"] is True
    assert report.trained_parameters == n_plain + q_params  # the query projections joined the trained set
    assert all(torch.equal(o.attn.q_proj.weight, w) for o, w in zip(decoder.layers, q_before))  # teacher intact
    assert all(not torch.equal(f.attn.q_proj.weight, w) for f, w in zip(folded.layers, q_before))  # trained


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    save_tiny("llama", root / "llama")
    gen = torch.Generator().manual_seed(1)
    words = ["alpha", "beta", "gamma", "delta", "stone", "river", "light", "north", "quiet", "seven"]
    text = " ".join(words[int(i)] for i in torch.randint(0, len(words), (6000,), generator=gen))
    (root / "text.txt").write_text(text)
    other = ["Zeta", "ORBIT", "42", "kilo;", "(mu)", "Tango", "x=1", "quartz", "VEIL", "n0rth"]  # another domain
    (root / "other.txt").write_text(" ".join(other[int(i)] for i in torch.randint(0, 10, (4000,), generator=gen)))
    return root


def _compress(root, out, *extra):
    return main(["compress", "-o", str(out), "--model", str(root / "llama"), "--calib-text", str(root / "text.txt"),
                 "--calib-samples", "4", "--calib-seq-len", "64", "--eval-window", "64", "--eval-tokens", "1024",
                 "--no-progress", *extra])


def test_quality_budget_meets_its_bound_on_validation_text(tiny_dir, tmp_path):
    out = tmp_path / "q"
    assert _compress(tiny_dir, out, "--max-ppl-increase", "0.05", "--validation-tokens", "1024") == 0
    report = json.loads((out / "compress.json").read_text())
    q = report["ranks"]["quality_budget"]
    assert max(q["validation_increase_pct"].values()) <= 5.0 and len(q["probes"]) == 7
    assert report["kv_ratio"] == pytest.approx(q["chosen_kv_ratio"])
    within = [p["kv_ratio"] for p in q["probes"] if p["within"]]
    assert q["chosen_kv_ratio"] == min(within + [1.0])
    assert all(max(p["increase_pct"].values()) > 5.0 for p in q["probes"] if not p["within"])
    assert report["ranks"]["allocation"] == "loss" and "sensitivity" in report["ranks"]


def test_quality_budget_bounds_the_worst_text_of_a_mix(tiny_dir, tmp_path):
    """Two calibration texts: every probe judged within the bound is within it on both texts' validation
    slices, every failed one exceeds it on at least one, and the chosen cache's rise on each is reported."""
    out = tmp_path / "q2"
    assert main(["compress", "-o", str(out), "--model", str(tiny_dir / "llama"), "--calib-text",
                 f"{tiny_dir / 'text.txt'}:1", f"{tiny_dir / 'other.txt'}:1", "--calib-samples", "4",
                 "--calib-seq-len", "64", "--eval-window", "64", "--eval-tokens", "0", "--max-ppl-increase", "0.05",
                 "--validation-tokens", "512", "--no-progress"]) == 0
    report = json.loads((out / "compress.json").read_text())
    q = report["ranks"]["quality_budget"]
    names = {str(tiny_dir / "text.txt"), str(tiny_dir / "other.txt")}
    assert set(q["validation_increase_pct"]) == names and set(q["validation_tokens"]) == names
    assert q["worst_increase_pct"] == max(q["validation_increase_pct"].values()) <= 5.0
    for p in q["probes"]:
        assert p["within"] == (max(p["increase_pct"].values()) <= 5.0)
        assert p["within"] == (set(p["increase_pct"]) == names)  # a failed probe stops at the first text over
    assert report["calibration"]["samples_per_text"] == dict.fromkeys(names, 2)


def test_healing_through_the_cli_and_projections_round_trip(tiny_dir, tmp_path):
    out = tmp_path / "h"
    assert _compress(tiny_dir, out, "--kv-ratio", "0.4", "--heal-steps", "3", "--heal-lr", "1e-3",
                     "--heal-batch", "3", "--heal-seq-len", "24") == 0
    report = json.loads((out / "compress.json").read_text())
    assert report["healing"]["steps"] == 3 and report["healing"]["trained_parameters"] > 0
    # the options reach the steps: the report records the shape of the windows heal() drew
    assert (report["healing"]["lr"], report["healing"]["batch"], report["healing"]["seq_len"]) == (1e-3, 3, 24)
    # the healed weights are what the projections file holds: reloading reproduces the healed perplexity
    from eigenkv.exporter.pipeline import CompressConfig, compress
    from eigenkv.exporter.sources import resolve_model
    config = CompressConfig(model=str(tiny_dir / "llama"), projections=str(out / "projections.safetensors"),
                            calib_text=str(tiny_dir / "text.txt"), calib_samples=4, calib_seq_len=64,
                            eval_window=64, eval_tokens=1024, progress=False)
    again = compress(config, source=resolve_model(config.model))  # a model resolved by the caller
    assert config.method is None and again.report["source_model"] == report["source_model"]
    for name, p in report["perplexity"].items():
        assert again.report["perplexity"][name]["folded"] == pytest.approx(p["folded"], rel=1e-5)
    assert again.report["ranks"]["key"] == report["ranks"]["key"]


def test_heal_query_through_the_cli_round_trips_the_trained_query_weights(tiny_dir, tmp_path):
    out = tmp_path / "hq"
    assert _compress(tiny_dir, out, "--kv-ratio", "0.4", "--heal-steps", "3", "--heal-lr", "1e-3",
                     "--heal-seq-len", "32", "--heal-query") == 0
    report = json.loads((out / "compress.json").read_text())
    assert report["healing"]["query"] is True
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    saved = load_file(str(out / "projections.safetensors"))
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_dir / "llama"))
    # the projections file holds the healed W_q (not the original's), so an export uses it
    assert not torch.equal(saved["layers.0.q_proj.weight"], hf.model.layers[0].self_attn.q_proj.weight.float())
    from eigenkv.exporter.pipeline import CompressConfig, compress
    from eigenkv.exporter.sources import resolve_model
    config = CompressConfig(model=str(tiny_dir / "llama"), projections=str(out / "projections.safetensors"),
                            calib_text=str(tiny_dir / "text.txt"), calib_samples=4, calib_seq_len=64,
                            eval_window=64, eval_tokens=1024, progress=False)
    again = compress(config, source=resolve_model(config.model))
    for name, p in report["perplexity"].items():
        assert again.report["perplexity"][name]["folded"] == pytest.approx(p["folded"], rel=1e-5)


def test_healing_defaults_are_two_windows_of_at_most_256_tokens():
    from eigenkv.exporter.pipeline import CompressConfig, heal_window
    assert heal_window(CompressConfig()) == 256 and heal_window(CompressConfig(calib_seq_len=64)) == 64
    assert heal_window(CompressConfig(calib_seq_len=64, heal_seq_len=512)) == 512
    assert CompressConfig().heal_batch == 2 and HealSettings().batch_size == 2


def test_a_calibration_text_shorter_than_one_healing_window_is_refused_by_name():
    from types import SimpleNamespace

    from eigenkv.errors import EigenError
    from eigenkv.exporter.pipeline import CompressConfig, _check_heal_streams
    texts = SimpleNamespace(calibration={"wiki": torch.zeros(5000), "mine.txt": torch.zeros(100)})
    _check_heal_streams(CompressConfig(heal_steps=0, heal_seq_len=512), texts)  # no healing: nothing to check
    _check_heal_streams(CompressConfig(heal_steps=5, heal_seq_len=100), texts)
    with pytest.raises(EigenError, match=r"^--heal-seq-len 512 is longer than the calibration text mine.txt \(100 tokens\)"):
        _check_heal_streams(CompressConfig(heal_steps=5, heal_seq_len=512), texts)


@pytest.mark.parametrize("extra, message", [
    (["--max-ppl-increase", "0"], "--max-ppl-increase is a fraction in (0, 10]"),
    (["--method", "eigen", "--kv-ratio", "0.5", "--heal-steps", "-1"], "--heal-steps must be >= 0"),
    (["--method", "loss-aware", "--error-budget", "0.02"], "--error-budget is the paper's search"),
    (["--heal-query"], "--heal-query trains the query projections while healing: pass --heal-steps N > 0 with it"),
    (["--heal-steps", "2", "--heal-batch", "0"], "--heal-batch must be >= 1 and --heal-seq-len >= 2 tokens"),
    (["--heal-steps", "2", "--heal-seq-len", "1"], "--heal-batch must be >= 1 and --heal-seq-len >= 2 tokens"),
    (["--heal-steps", "2", "--heal-seq-len", "999999"], "--heal-seq-len 999999 exceeds the model's maximum positions (128)"),
    (["--method", "pca"], "unknown --method 'pca'"),
    (["--max-ppl-increase", "0.1", "--validation-tokens", "999999"], "is too short for 999936 validation tokens"),
])
def test_bad_quality_options_are_one_line(tiny_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    assert _compress(tiny_dir, out, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and not out.exists()
