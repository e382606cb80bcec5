"""Audio: decoding, synthetic partial spoofs, XLS-R frames, the XAI head, prototypes."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from conftest import run_cli

from featcache.analyze.prototypes import analyze_prototypes
from featcache.cache import open_cache
from featcache.data.audio import frame_labels, n_frames, read_audio
from featcache.e2e.evaluate import evaluate_run
from featcache.errors import BackboneError, ManifestError, StaleCacheError
from featcache.extract import extract
from featcache.extract.registry import get_backbone
from featcache.extract.xlsr import collate_audio
from featcache.heads.task import load_run
from featcache.train import train_head


def _tree_hashes(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.fixture(scope="module")
def audio(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("audio") / "data"
    run_cli("-q", "synth", "audio", out, "--n", "45", "--seed", "3", "--min-seconds", "1.0", "--max-seconds", "2.5")
    return out


@pytest.fixture(scope="module")
def frames_cache(audio, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "xlsr"
    extract("xlsr", audio / "manifest.csv", out, model="tiny", batch_size=4, num_workers=0, part_rows=16,
            progress=False)
    return out


def test_resampling_keeps_a_tones_frequency(tmp_path):
    rate, freq = 44100, 1234.0
    t = np.arange(int(rate * 1.0)) / rate
    stereo = np.stack([np.sin(2 * np.pi * freq * t), 0.5 * np.sin(2 * np.pi * freq * t)], 1)
    sf.write(tmp_path / "tone.wav", stereo, rate, subtype="FLOAT")
    x = read_audio(str(tmp_path / "tone.wav"))
    assert len(x) == 16000
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    peak = np.fft.rfftfreq(len(x), 1 / 16000)[np.argmax(spec)]
    assert abs(peak - freq) <= 1.0
    assert np.isclose(np.abs(x[1000:-1000]).max(), 0.75, atol=0.01)  # mono is the mean of the channels
    assert len(read_audio(str(tmp_path / "tone.wav"), max_seconds=0.5)) == 8000


def test_synth_audio_same_seed_same_bytes(audio, tmp_path):
    from featcache.data.synth_audio import synth_audio

    synth_audio(tmp_path / "again", n=45, seed=3, min_seconds=1.0, max_seconds=2.5, progress=False)
    assert _tree_hashes(audio) == _tree_hashes(tmp_path / "again")
    man = (audio / "manifest.csv").read_text()
    assert "segments" in man.splitlines()[0]
    proto = (audio / "LA/ASVspoof2019_LA_cm_protocols/ASVspoof2019.LA.cm.train.trn.txt").read_text().split("\n")
    assert proto[0].split()[2] == "-" and proto[0].split()[4] in ("bonafide", "spoof")
    x, rate = sf.read(next((audio / "LA/ASVspoof2019_LA_train/flac").iterdir()))
    assert rate == 16000 and 1.0 <= len(x) / rate <= 2.5


def test_frame_labels_from_intervals():
    # frame t is centred at (320 t + 200) / 16000 s = 0.0125 + 0.02 t
    labels = frame_labels(10, "0.05-0.09;0.15-0.155")
    centres = 0.0125 + 0.02 * np.arange(10)
    brute = np.array([any(a <= c < b for a, b in [(0.05, 0.09), (0.15, 0.155)]) for c in centres])
    assert labels.tolist() == brute.astype(int).tolist() == [0, 0, 1, 1, 0, 0, 0, 1, 0, 0]
    assert frame_labels(3, "", utterance_label=0).tolist() == [0, 0, 0]
    assert frame_labels(3, "", utterance_label=1).tolist() == [-1, -1, -1]
    assert [n_frames(n) for n in (399, 400, 719, 720, 16000)] == [0, 1, 1, 2, 49]


def test_frames_round_trip_and_padded_batching(audio, frames_cache):
    cache = open_cache(frames_cache)
    assert cache.kind == "frames" and cache.backbone["layer"] == "final"
    d = cache.load_frames()
    bb = get_backbone("xlsr", "tiny")
    paths = [str(audio / p) for p in d.meta["path"]] if "path" in d.meta else None
    paths = paths or [str(audio / p) for p in cache.meta(["path"])["path"]]
    ds = bb.dataset(paths, cache.meta())
    # one utterance at a time, no padding: the cache's frames (fp16) and labels
    for i in (0, 7, 20):
        out = bb.forward(collate_audio([ds[i]])[1], torch.device("cpu"))
        got = d.arrays["frames"][d.arrays["offsets"][i]:d.arrays["offsets"][i + 1]]
        assert got.shape == out["frames"][0].shape
        np.testing.assert_allclose(got, out["frames"][0], atol=2e-2, rtol=1e-2)
        assert n_frames(len(ds[i][1][0])) == len(got)
        labels = d.arrays["frame_labels"][d.arrays["offsets"][i]:d.arrays["offsets"][i + 1]]
        assert labels.tolist() == frame_labels(len(got), d.meta["segments"][i], int(d.meta["label"][i])).tolist()
    # a padded batch of different lengths gives each utterance's frames
    items = [ds[i] for i in (0, 7, 20, 33)]
    assert len({len(it[1][0]) for it in items}) > 1
    batched = bb.forward(collate_audio(items)[1], torch.device("cpu"))["frames"]
    for it, fr in zip(items, batched):
        alone = bb.forward(collate_audio([it])[1], torch.device("cpu"))["frames"][0]
        np.testing.assert_allclose(fr, alone, atol=1e-4)


def test_resumed_extraction_is_identical(audio, frames_cache, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(frames_cache, out)
    shutil.rmtree(out / "parts" / "00001")
    r = extract("xlsr", audio / "manifest.csv", out, model="tiny", batch_size=4, num_workers=0, part_rows=16,
                progress=False)
    assert r.parts_written == 1 and r.parts_resumed == 2
    a, b = open_cache(frames_cache).load_frames(), open_cache(out).load_frames()
    for name in ("frames", "offsets", "frame_labels"):
        assert np.array_equal(a.arrays[name], b.arrays[name])
    bad = (audio / "manifest.csv").read_text().replace("0.00-", "0.50-0.20;0.00-", 1)
    (audio / "bad_segments.csv").write_text(bad)
    with pytest.raises(ManifestError, match="0.50-0.20"):
        extract("xlsr", audio / "bad_segments.csv", tmp_path / "bad", model="tiny", num_workers=0, progress=False)
    (audio / "bad_segments.csv").unlink()
    with pytest.raises(StaleCacheError, match="backbone.layer"):
        extract("xlsr", audio / "manifest.csv", out, model="tiny", layer="1", num_workers=0, part_rows=16,
                progress=False)


def test_layer_reproduces_transformers_hidden_states(audio):
    x = read_audio(str(next((audio / "LA/ASVspoof2019_LA_train/flac").iterdir())))
    x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    inputs = collate_audio([(0, (x, "", 0), "")])[1]
    for layer in (None, "0", "1", "2"):
        bb = get_backbone("xlsr", "tiny", layer=layer)
        with torch.no_grad():
            ref = bb.module(torch.from_numpy(x)[None], output_hidden_states=True)
        want = ref.last_hidden_state if layer is None else ref.hidden_states[int(layer)]
        got = bb.forward(inputs, torch.device("cpu"))["frames"][0]
        np.testing.assert_allclose(got, want[0].numpy(), atol=1e-5)
    # the default is the output of the encoder's final LayerNorm, after the last layer
    with torch.no_grad():
        ln = bb.module.encoder.layer_norm(ref.hidden_states[-1])
    np.testing.assert_allclose(ref.last_hidden_state.numpy(), ln.numpy(), atol=1e-5)
    with pytest.raises(BackboneError, match="out of range"):
        get_backbone("xlsr", "tiny", layer="9")


def _to_fairseq(name: str) -> str:
    """transformers Wav2Vec2Model names -> fairseq wav2vec2 names (written independently of the loader)."""
    table = [
        ("feature_projection.projection.", "post_extract_proj."),
        ("feature_projection.layer_norm.", "layer_norm."),
        ("encoder.pos_conv_embed.conv.parametrizations.weight.original0", "encoder.pos_conv.0.weight_g"),
        ("encoder.pos_conv_embed.conv.parametrizations.weight.original1", "encoder.pos_conv.0.weight_v"),
        ("encoder.pos_conv_embed.conv.weight_g", "encoder.pos_conv.0.weight_g"),
        ("encoder.pos_conv_embed.conv.weight_v", "encoder.pos_conv.0.weight_v"),
        ("encoder.pos_conv_embed.conv.bias", "encoder.pos_conv.0.bias"),
        ("masked_spec_embed", "mask_emb"),
        (".attention.", ".self_attn."),
        (".feed_forward.intermediate_dense.", ".fc1."),
        (".feed_forward.output_dense.", ".fc2."),
    ]
    for a, b in table:
        name = name.replace(a, b)
    parts = name.split(".")
    if name.startswith("feature_extractor.conv_layers."):
        parts[3] = {"conv": "0", "layer_norm": "2.1"}[parts[3]]
    elif name.startswith("encoder.layers.") and parts[3] == "layer_norm":
        parts[3] = "self_attn_layer_norm"
    return ".".join(parts)


def test_fairseq_checkpoint_loads_into_transformers(audio, tmp_path):
    src = get_backbone("xlsr", "tiny", seed=7)
    state = {f"module.ssl_model.model.{_to_fairseq(k)}": v for k, v in src.module.state_dict().items()}
    state["module.ssl_model.model.quantizer.vars"] = torch.zeros(3)
    state["module.ssl_model.model.unknown_head.weight"] = torch.zeros(2)
    state["module.backend.classifier.weight"] = torch.zeros(2, 4)
    torch.save({"model": state}, tmp_path / "detector.pth")
    with pytest.warns(UserWarning, match="unknown_head"):
        loaded = get_backbone("xlsr", "tiny", str(tmp_path / "detector.pth"), seed=0)
    assert loaded.load_report["unmatched"] == ["unknown_head.weight"]
    assert loaded.load_report["pretraining_only"] == ["quantizer.vars"]
    assert loaded.normalize is False
    x = torch.randn(1, 8000)
    with torch.no_grad():
        np.testing.assert_array_equal(loaded.module(x).last_hidden_state.numpy(), src.module(x).last_hidden_state.numpy())
    assert loaded.fingerprint()["weights_sha256"] == src.fingerprint()["weights_sha256"]
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(BackboneError, match="no parameters under an ssl_model prefix"):
        get_backbone("xlsr", "tiny", str(tmp_path / "other.pth"))


def test_ema_update_and_loss_against_brute_force():
    from featcache.losses.prototype import ema_update, frame_contrastive

    g = torch.Generator().manual_seed(0)
    h = F.normalize(torch.randn(3, 5, 4, generator=g), dim=-1)
    p = F.normalize(torch.randn(2, 4, generator=g), dim=-1)
    y = torch.tensor([0, 1, 1])
    w = torch.rand(3, 5, generator=g)
    mask = torch.ones(3, 5)
    mask[2, 3:] = 0
    tau = 0.07
    totals = {"importance": 0.0, "frames": 0.0}
    for b in range(3):
        num = den = frames = 0.0
        for t in range(5):
            if mask[b, t]:
                logits = [float(h[b, t] @ p[c]) / tau for c in range(2)]
                nll = -(logits[int(y[b])] - np.log(sum(np.exp(v) for v in logits)))
                num += float(w[b, t]) * nll
                den += float(w[b, t])
                frames += 1
        totals["importance"] += num / den
        totals["frames"] += num / frames
    for norm, total in totals.items():
        assert np.isclose(float(frame_contrastive(h, p, y, w, mask, tau, norm)), total / 3, rtol=1e-5)
    # EMA: p_c <- normalize(m p_c + (1 - m) normalize(weighted mean of class-c frames))
    weights = torch.where((y == 1)[:, None], w, torch.ones_like(w))
    new = ema_update(p.clone(), h, y, weights, mask, momentum=0.9)
    for c in range(2):
        acc, tot = np.zeros(4), 0.0
        for b in range(3):
            for t in range(5):
                if y[b] == c and mask[b, t]:
                    acc += float(weights[b, t]) * h[b, t].numpy()
                    tot += float(weights[b, t])
        mean = acc / tot
        mean /= np.linalg.norm(mean)
        want = 0.9 * p[c].numpy() + 0.1 * mean
        np.testing.assert_allclose(new[c].numpy(), want / np.linalg.norm(want), atol=1e-6)


def test_prototype_purity_on_synthetic_clusters():
    from featcache.analyze.prototypes import prototype_purity

    rng = np.random.default_rng(0)
    e1, e2 = np.eye(8)[0], np.eye(8)[1]
    near = e1 + 0.01 * rng.standard_normal((60, 8))  # class 0, cosine ~1 to prototype 0
    tilt = np.cos(0.5) * e1 + np.sin(0.5) * np.eye(8)[2] + 0.01 * rng.standard_normal((40, 8))  # class 1, cos ~0.88
    far = e2 + 0.01 * rng.standard_normal((100, 8))  # class 1, cosine ~0
    frames = np.concatenate([near, tilt, far]).astype(np.float32)
    cls = np.array([0] * 60 + [1] * 140)
    purity, _, ids, _ = prototype_purity(frames, cls, np.stack([e1, e2]).astype(np.float32), device="cpu")
    assert purity["bonafide"] == {10: 1.0, 50: 1.0, 100: 0.6}
    assert purity["spoof"] == {10: 1.0, 50: 1.0, 100: 1.0}
    assert set(ids[0, :60]) == set(range(60))


def test_collapse_detection_stops_training(frames_cache, tmp_path):
    from featcache.heads.xai import collapse_message

    assert collapse_message({"w_max": 0.01, "w_min": 0.0, "w_mean": 0.005, "w_std": 0.001}, 0.02, 3).startswith(
        "importance collapsed to 0 at epoch 3")
    assert collapse_message({"w_max": 1.0, "w_min": 0.99, "w_mean": 0.995, "w_std": 0.001}, 0.02, 1).startswith(
        "importance collapsed to 1")
    assert collapse_message({"w_max": 0.9, "w_min": 0.0, "w_mean": 0.3, "w_std": 0.2}, 0.02, 1) is None
    r = train_head("xai", frames_cache, tmp_path / "run", preset="bare", progress=False,
                   sets=["loss.lambda_sparsity=50", "loss.lambda_bonafide=50", "training.lr=0.01", "training.epochs=12"])
    assert r.extra["stopped"].startswith("importance collapsed to 0")
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    # per-class importance statistics are logged every epoch (of the val split, per run)
    assert len(log) < 12 and log[-1]["val_w_mean_spoof"] < 0.02
    assert {"val_w_mean_bonafide", "val_w_std_bonafide", "val_w_mean_spoof", "val_w_std_spoof"} <= set(log[0])
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["stopped"].startswith("importance collapsed")


def test_xai_localizes_partial_spoofs(frames_cache, tmp_path):
    run = tmp_path / "xai"
    run_cli("-q", "train-head", "xai", "--cache", frames_cache, "--prototype-mode", "ema", "--set",
            "training.epochs=3", "--set", "logging.plots=false", "--out", run)
    evaluate_run(run, frames_cache, split="test", name="synth", plots=True)  # a run without plots gets them here
    metrics = json.loads((run / "eval" / "synth_test" / "metrics.json").read_text())
    assert metrics == json.loads((run / "eval" / "test" / "metrics.json").read_text())
    assert metrics["loc_utterances"] == 6 and metrics["loc_partial_utterances"] == 3
    assert metrics["loc_auroc"] > 0.6, metrics  # held-out utterances
    assert (run / "eval" / "synth_test" / "plots" / "importance.png").is_file()
    assert not (run / "plots").exists() and not (run / "eval" / "test" / "plots").exists()  # logging.plots=false
    assert len((run / "eval" / "synth_test" / "predictions.csv").read_text().splitlines()) == 1 + 9
    # the pooled localization AUROC, recomputed with sklearn from the head's importance maps
    from sklearn.metrics import roc_auc_score

    task = load_run(run, "cpu")
    task.load(open_cache(frames_cache), splits=("test",))
    ws = task.importances("test")[0]  # the one run's maps, in the split's row order
    rows = task.split_rows("test")  # their rows in the cache's flat frame table
    off, fl = task.flat["offsets"].numpy(), task.flat["frame_labels"]
    spoofed = [i for i, lab in enumerate(task.data["test"].meta["label"]) if lab == 1]
    y = np.concatenate([fl[off[rows[i]]:off[rows[i] + 1]] for i in spoofed])
    s = np.concatenate([ws[i] for i in spoofed])
    # the run may have been evaluated on a GPU and is recomputed here on the CPU: float32 kernels
    # differ in the last bits (0.697853 vs 0.697861 seen on an H100), so compare to 1e-4
    assert np.isclose(roc_auc_score(y, s), metrics["loc_auroc"], rtol=0, atol=1e-4)
    report = analyze_prototypes(run, frames_cache)
    assert set(report["purity"]) == {"bonafide", "spoof"} and report["frames"] > 0
    assert (run / "prototypes" / "prototypes_map.png").is_file()
    assert "purity@10" in (run / "prototypes" / "prototypes.md").read_text()
    # fixed prototypes are the train class means (of centred unit frames), and stay so
    fixed = train_head("xai", frames_cache, tmp_path / "fixed", sets=["model.prototype_mode=fixed", "training.epochs=1"],
                       progress=False)
    task = load_run(fixed.run_dir, "cpu")
    d = open_cache(frames_cache).load_frames("train")
    centred = d.arrays["frames"] - d.arrays["frames"].mean(0)
    unit = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    cls = np.repeat(d.meta["label"].to_numpy(), np.diff(d.arrays["offsets"]))
    for c in (0, 1):
        mean = unit[cls == c].mean(0)
        np.testing.assert_allclose(task.module.prototypes[0, c].numpy(), mean / np.linalg.norm(mean), atol=1e-5)


def test_adapters_read_the_synthetic_layouts(audio, tmp_path):
    import pandas as pd

    from featcache.data.adapters import build_manifest

    truth = pd.read_csv(audio / "manifest.csv", keep_default_na=False).set_index("sample_id")
    for fmt in ("asvspoof19", "partialspoof"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            df = build_manifest(fmt, audio / {"asvspoof19": "LA", "partialspoof": "PartialSpoof"}[fmt],
                                tmp_path / f"{fmt}.csv").df
            whole = build_manifest(fmt, audio, tmp_path / "whole.csv").df  # files before links to them
            assert whole["path"].str.contains("/LA/ASVspoof2019_LA_").all()
        df.index = df["sample_id"].str.rsplit("/", n=1).str[-1].str.split(".").str[0]
        t = truth.loc[df.index]
        assert (df["label"].to_numpy() == t["label"].to_numpy()).all() and (df["split"] == t["split"]).all()
        assert (df["method"] == t["method"]).all() and (df["identity"] == t["identity"]).all()
        if fmt == "partialspoof":  # the 20 ms segment labels give back the intervals
            assert (df["segments"] == t["segments"]).all()


def test_unreadable_audio_is_skipped_and_local_hf_folder_loads(audio, tmp_path):
    import pandas as pd

    man = pd.read_csv(audio / "manifest.csv", keep_default_na=False).iloc[:3].copy()
    man["path"] = [str(audio / p) for p in man["path"]]
    (tmp_path / "broken.flac").write_bytes(b"not audio at all")
    man.loc[1, "path"] = str(tmp_path / "broken.flac")
    man.to_csv(tmp_path / "m.csv", index=False)
    # a local Hugging Face folder (save_pretrained) with the tiny weights
    get_backbone("xlsr", "tiny", seed=5).module.save_pretrained(tmp_path / "hf")
    r = extract("xlsr", tmp_path / "m.csv", tmp_path / "c", model=str(tmp_path / "hf"), num_workers=0, progress=False)
    assert r.failed == 1 and r.failures[0]["sample_id"] == man.loc[1, "sample_id"]
    cache = open_cache(tmp_path / "c")
    part = cache.read_part(0)
    assert part["ok"].tolist() == [True, False, True]
    assert part["offsets"][2] - part["offsets"][1] == 0  # no frames for the unreadable row
    assert cache.backbone["pretrained"] == str((tmp_path / "hf").resolve())
    assert cache.backbone["weights_sha256"] == get_backbone("xlsr", "tiny", seed=5).fingerprint()["weights_sha256"]
