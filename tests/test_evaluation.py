"""The evaluation harness on tiny generated models and tiny datasets, checked against hand computation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertForSequenceClassification, BertModel

from merging.config import MergeConfig
from merging.engine.merge import MergeOptions, run_merge
from merging.errors import CheckpointError, ConfigError
from merging.evaluation import Evaluator, Head, TaskSpec, accuracy, fit_probe, load_head, load_split, macro_f1
from merging.evaluation.causal import load_causal_lm, perplexity
from merging.evaluation.encoder import encode, load_encoder
from merging.evaluation.plot import plot_report
from merging.evaluation.search import grid_points, search_validation, with_parameters
from merging.synthetic import WORDS, build_family
from merging.zoo.splits import write_parquet
from tests.helpers import build_tiny_tasks


def test_accuracy_and_macro_f1_by_hand():
    pred = torch.tensor([0, 1, 1, 2, 2, 2])
    gold = torch.tensor([0, 1, 2, 2, 2, 0])
    assert accuracy(pred, gold) == pytest.approx(4 / 6)
    # class 0: tp1 fp0 fn1 -> 2/3; class 1: tp1 fp1 fn0 -> 2/3; class 2: tp2 fp1 fn1 -> 4/6
    assert macro_f1(pred, gold) == pytest.approx((2 / 3 + 2 / 3 + 4 / 6) / 3)
    with pytest.raises(ValueError):
        accuracy(torch.tensor([]), torch.tensor([]))


def test_probe_separates_separable_features_and_binary_matches_softmax():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=gen) * 3 + 10  # far from standardized, to exercise the folding
    y = (x[:, 0] + x[:, 1] > 20).long()
    head = fit_probe(x, y, 2)
    assert head.weight.shape == (2, 5)
    assert accuracy(head.predict(x), y) > 0.97
    # Three classes, one of them absent from train: never predicted.
    y3 = y.clone()
    head3 = fit_probe(x, y3, 3)
    assert head3.num_labels == 3 and int((head3.predict(x) == 2).sum()) == 0


def test_probe_with_validation_is_a_fresh_fit_at_the_c_best_on_validation():
    """The probe keeps the grid's winning model instead of fitting it again: it must equal a refit at that C
    (smallest C among validation ties), computed here the slow way with sklearn directly."""
    from sklearn.linear_model import LogisticRegression

    from merging.evaluation.heads import PROBE_C_GRID

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, 6, generator=gen) * 2 + 3
    y = ((x[:, 0] - x[:, 2] + torch.randn(300, generator=gen) * 2) > 0).long() + (x[:, 3] > 4).long()
    xt, yt, xv, yv = x[:200], y[:200], x[200:], y[200:]
    head = fit_probe(xt, yt, 3, xv, yv, seed=0)
    mean, std = xt.double().numpy().mean(0), xt.double().numpy().std(0) + 1e-6
    z, zv = (xt.double().numpy() - mean) / std, (xv.double().numpy() - mean) / std
    scores = {
        c: LogisticRegression(C=c, max_iter=2000, random_state=0).fit(z, yt.numpy()).score(zv, yv.numpy())
        for c in PROBE_C_GRID
    }
    best = min(c for c in PROBE_C_GRID if scores[c] == max(scores.values()))
    ref = LogisticRegression(C=best, max_iter=2000, random_state=0).fit(z, yt.numpy())
    assert torch.allclose(head.weight.double(), torch.from_numpy(ref.coef_ / std).float().double(), atol=0, rtol=0)


# --- datasets -----------------------------------------------------------------------------


def _rows(n: int, labels: int = 2) -> tuple[list[str], list[int]]:
    texts = [f"{WORDS[i % len(WORDS)]} {WORDS[(i * 7) % len(WORDS)]}" for i in range(n)]
    return texts, [i % labels for i in range(n)]


def test_load_split_from_parquet_folder_jsonl_csv_and_saved_dataset(tmp_path: Path):
    texts, labels = _rows(10)
    write_parquet(tmp_path / "pq" / "train.parquet", texts, labels)
    spec = TaskSpec(name="t", dataset=str(tmp_path / "pq"), num_labels=2)
    split = load_split(spec, "train")
    assert split.texts == texts and split.labels == labels

    lines = [json.dumps({"sentence": t, "y": "pos" if lab else "neg", "part": "test"}) for t, lab in zip(texts, labels)]
    (tmp_path / "one.jsonl").write_text("\n".join(lines))
    spec = TaskSpec(
        name="j",
        dataset=str(tmp_path / "one.jsonl"),
        text_column="sentence",
        label_column="y",
        split_column="part",
        label_names=["neg", "pos"],
    )
    assert load_split(spec, "test").labels == labels

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "validation.csv").write_text(
        "text,label\n" + "\n".join(f"{t},{lab}" for t, lab in zip(texts, labels))
    )
    assert load_split(TaskSpec(name="c", dataset=str(tmp_path / "c")), "validation").labels == labels

    import datasets

    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": texts, "label": labels})}).save_to_disk(
        str(tmp_path / "hf")
    )
    assert load_split(TaskSpec(name="h", dataset=str(tmp_path / "hf")), "test").texts == texts


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_column", "has no column 'label'"),
        ("label_range", "label 2 is outside 0..1"),
        ("empty", "is empty"),
        ("no_split_file", "holds no validation.parquet"),
        ("not_there", "does not exist"),
        ("bad_label", "is not a class index"),
        ("no_split_column", "has no `split` column"),
    ],
)
def test_dataset_bad_inputs_are_named(tmp_path: Path, case: str, message: str):
    texts, labels = _rows(6)
    folder = tmp_path / "d"
    spec = TaskSpec(name="bad", dataset=str(folder), num_labels=2)
    split = "train"
    if case == "missing_column":
        import pyarrow as pa
        import pyarrow.parquet as pq

        folder.mkdir()
        pq.write_table(pa.table({"text": texts, "target": labels}), folder / "train.parquet")
    elif case == "label_range":
        write_parquet(folder / "train.parquet", texts, [0, 1, 2, 0, 1, 0])
    elif case == "empty":
        write_parquet(folder / "train.parquet", [], [])
    elif case == "no_split_file":
        write_parquet(folder / "train.parquet", texts, labels)
        split = "validation"
    elif case == "not_there":
        spec = TaskSpec(name="bad", dataset=str(tmp_path / "nowhere.parquet"))
    elif case == "bad_label":
        folder.mkdir()
        (folder / "train.jsonl").write_text("\n".join(json.dumps({"text": t, "label": "maybe"}) for t in texts))
    elif case == "no_split_column":
        (tmp_path / "f.csv").write_text("text,label\na,0\n")
        spec = TaskSpec(name="bad", dataset=str(tmp_path / "f.csv"))
    with pytest.raises(ConfigError, match="bad") as info:
        load_split(spec, split)
    assert message in str(info.value)


def test_hub_dataset_name_offline_fails_clearly(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"datasets\.load_dataset failed"):
        load_split(TaskSpec(name="hub", dataset="someone/not-cached-here"), "test")


def test_task_spec_label_names_must_match_count():
    with pytest.raises(ValueError, match="num_labels is 3 but label_names has 2"):
        TaskSpec(name="x", dataset="d", num_labels=3, label_names=["a", "b"])


# --- harness on a tiny family -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """A base, two classification fine-tunes (2 and 3 labels), a merge, and three tiny tasks (one out-of-domain)."""
    root = tmp_path_factory.mktemp("tiny-eval")
    base, fts, tasks = build_tiny_tasks(root)
    config = MergeConfig(
        merge_method="task_arithmetic",
        base_model=str(base),
        models=[{"model": str(fts[0]), "name": "two"}, {"model": str(fts[1]), "name": "three"}],
        parameters={"lambda": 0.5},
    )
    merged = root / "merged"
    run_merge(config, merged, MergeOptions(progress=False))
    return root, base, fts, tasks, merged, config


def _hand_scores(encoder_dir: Path, head_dir: Path, texts: list[str], labels: list[int]) -> float:
    """The slow, obvious computation: BertModel pooler output -> the head's Linear -> argmax -> accuracy."""
    tok = AutoTokenizer.from_pretrained(encoder_dir)
    try:
        enc = BertForSequenceClassification.from_pretrained(encoder_dir).bert
    except Exception:
        enc = BertModel.from_pretrained(encoder_dir)
    head = load_head(head_dir)
    enc.eval()
    correct = 0
    with torch.no_grad():
        for text, label in zip(texts, labels):
            pooled = enc(**tok(text, return_tensors="pt", truncation=True, max_length=8)).pooler_output[0]
            correct += int(int((head.weight @ pooled + head.bias).argmax()) == label)
    return correct / len(labels)


def test_harness_matches_hand_computation(tiny):
    _, base, fts, tasks, merged, _ = tiny
    evaluator = Evaluator(tasks, base)
    report = evaluator.evaluate({"ta": merged}, "test", cross=True)
    data = report.to_json()
    json.dumps(data)  # serialisable
    for t, ft in zip(("two", "three"), fts):
        test = evaluator.split(t, "test")
        assert data["finetuned"][t] == pytest.approx(_hand_scores(ft, ft, test.texts, test.labels))
        hand_merged = _hand_scores(merged, merged / "heads" / f"{t}.safetensors", test.texts, test.labels)
        assert data["models"]["ta"]["scores"][t] == pytest.approx(hand_merged)
        assert data["models"]["ta"]["normalized"][t] == pytest.approx(hand_merged / data["finetuned"][t])
        assert data["cross"][t][t] == pytest.approx(data["finetuned"][t])
    # Out-of-domain retention: a probe on the merged encoder against a probe on the base encoder.
    ood = data["models"]["ta"]["ood"]["ood"]
    assert ood["retention"] == pytest.approx(ood["merged_probe"] / ood["base_probe"])
    assert set(data["base_probe"]["scores"]) == {"two", "three", "ood"}
    avg = data["models"]["ta"]["average"]
    assert avg == pytest.approx(sum(data["models"]["ta"]["scores"].values()) / 2)
    assert data["tasks"][2]["role"] == "out_of_domain"


def test_features_are_deterministic_and_order_preserving(tiny):
    _, base, _, _, _, _ = tiny
    encoder = load_encoder(base)
    texts = ["merge model", "the", "a task vector of the neuron"]
    feats = encode(encoder, texts, 8, batch_size=2)
    one_by_one = torch.cat([encode(encoder, [t], 8) for t in texts])
    torch.testing.assert_close(feats, one_by_one, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats, encode(encoder, texts, 8, batch_size=2))


def test_head_outside_label_range_is_named(tiny):
    _, base, fts, tasks, _, _ = tiny
    # Task "three" (labels 0..2) scored with the 2-label head of fine-tune 0.
    wrong = [t.model_copy(update={"model": str(fts[0])}) if t.name == "three" else t for t in tasks]
    with pytest.raises(ConfigError, match="task three: split test has label 2 but the head has only 2 outputs"):
        Evaluator(wrong, base).finetuned_scores("test")


def test_mismatched_tokenizer_is_named(tiny, tmp_path: Path):
    _, base, _, _, _, _ = tiny
    from transformers import BertTokenizer

    big = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(200)]
    (tmp_path / "vocab.txt").write_text("\n".join(big) + "\n")
    BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"the tokenizer has 205 tokens but the encoder .* embeds only 64"):
        load_encoder(base, tokenizer_path=tmp_path)


def test_folder_without_head_layer_or_config_is_named(tmp_path: Path):
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_encoder(tmp_path)
    with pytest.raises(CheckpointError, match="no classification head"):
        load_head(_write_tensors(tmp_path / "x.safetensors", {"encoder.w": torch.zeros(2, 2)}))


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    return path


def test_plot_writes_png(tiny, tmp_path: Path):
    _, base, _, tasks, merged, _ = tiny
    report = Evaluator(tasks, base).evaluate({"ta": merged}).to_json()
    out = plot_report(report, tmp_path / "p" / "bars.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_validation_search_picks_the_best_validation_point(tiny, tmp_path: Path):
    _, base, _, tasks, _, config = tiny
    evaluator = Evaluator(tasks, base)
    grid = {"lambda": [0.0, 0.5, 1.0]}
    result = search_validation(config, grid, evaluator, tmp_path / "search")
    by_hand = []
    for lam in grid["lambda"]:
        out = tmp_path / f"hand-{lam}"
        run_merge(with_parameters(config, {"lambda": lam}), out, MergeOptions(progress=False))
        by_hand.append(Evaluator(tasks, base).model_scores(out, "validation").average)
    assert [p.score for p in result.points] == pytest.approx(by_hand)
    assert result.best == {"lambda": grid["lambda"][by_hand.index(max(by_hand))]}
    assert result.best_dir is not None and (result.best_dir / "config.json").is_file()
    assert sorted(p.name for p in (tmp_path / "search").iterdir()) == ["best"]


def test_search_grid_errors_name_the_parameter(tiny):
    *_, config = tiny
    with pytest.raises(ConfigError, match="task_arithmetic has no parameter lambda_parallel"):
        with_parameters(config, {"lambda_parallel": 0.5})
    with pytest.raises(ConfigError, match="non-empty list"):
        grid_points({"lambda": []})
    assert grid_points({"a": [1, 2], "b": [3]}) == [{"a": 1, "b": 3}, {"a": 2, "b": 3}]


# --- causal language models ---------------------------------------------------------------------


def test_perplexity_matches_the_models_own_loss(tmp_path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base, _ = build_family(tmp_path, "llama", 0)
    vocab = {w: i for i, w in enumerate(["<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<unk>").save_pretrained(base)
    model, tokenizer = load_causal_lm(base)
    texts = ["the model of the task", "merge a neuron vector with the base model and it is a task"]
    result = perplexity(model, tokenizer, texts, max_length=64, batch_size=2)
    # By hand: the model's own mean token loss, weighted by predicted tokens per text.
    nll, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            loss = model(input_ids=ids, labels=ids).loss
            nll += float(loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    assert result["tokens"] == count
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_head_state_dict_round_trip(tmp_path: Path):
    head = Head(torch.randn(3, 4), torch.randn(3))
    path = _write_tensors(tmp_path / "h.safetensors", head.state_dict())
    back = load_head(path)
    torch.testing.assert_close(back.weight, head.weight)
    torch.testing.assert_close(back.bias, head.bias)


def test_feature_cache_returns_the_same_bits_once_encoded_and_misses_on_any_change(tiny, tmp_path: Path, monkeypatch):
    """Features are keyed by the encoder's file contents, the texts in order, max length and batch size."""
    import shutil

    import merging.evaluation.feature_cache as fc

    monkeypatch.setenv("MERGEFLOW_CACHE_DIR", str(tmp_path / "cache"))
    _root, base, _fts, _tasks, _merged, _config = tiny
    calls: list[int] = []
    real = fc.encode

    def counting(*args, **kwargs):
        calls.append(len(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(fc, "encode", counting)
    folder = tmp_path / "enc"
    shutil.copytree(base, folder)
    encoder = load_encoder(folder)
    texts = [" ".join(WORDS[i : i + 4]) for i in range(0, 40, 4)]
    first = fc.encode_cached(encoder, texts, 16, 4)
    again = fc.encode_cached(load_encoder(folder), texts, 16, 4)
    assert torch.equal(first, again) and calls == [10]  # the second came from disk, bit for bit
    assert torch.equal(first, encode(encoder, texts, 16, 4))
    # Each of these is a different key: encoded again.
    fc.encode_cached(encoder, list(reversed(texts)), 16, 4)
    fc.encode_cached(encoder, texts, 8, 4)
    fc.encode_cached(encoder, texts, 16, 3)
    assert calls == [10, 10, 10, 10]
    # The same folder with changed weights (rewritten in place, even with its mtime put back) is a miss.
    from tests.helpers import scale_in_place_keeping_mtime

    scale_in_place_keeping_mtime(folder / "model.safetensors", "attention.self.query.weight")
    changed = fc.encode_cached(load_encoder(folder), texts, 16, 4)
    assert calls[-1] == 10 and len(calls) == 5 and not torch.equal(changed, first)
    # A damaged entry is encoded again and replaced; with the cache off nothing is read or written.
    entries = sorted((tmp_path / "cache" / "features").glob("*/*.safetensors"))
    assert len(entries) == 5
    for entry in entries:
        entry.write_bytes(b"not safetensors")
    assert torch.equal(fc.encode_cached(load_encoder(folder), texts, 16, 4), changed) and len(calls) == 6
    monkeypatch.setenv("MERGEFLOW_FEATURE_CACHE", "0")
    shutil.rmtree(tmp_path / "cache" / "features")
    fc.encode_cached(encoder, texts, 16, 4)
    assert len(calls) == 7 and not (tmp_path / "cache" / "features").exists()


def test_the_evaluator_reads_base_and_finetune_features_back_across_runs(tiny, tmp_path: Path, monkeypatch):
    import merging.evaluation.feature_cache as fc

    monkeypatch.setenv("MERGEFLOW_CACHE_DIR", str(tmp_path / "cache"))
    _root, base, _fts, tasks, merged, _config = tiny
    first = Evaluator(tasks, base).evaluate({"merged": merged}, "test").to_json()
    calls: list[int] = []
    real = fc.encode
    monkeypatch.setattr(fc, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    fits: list[int] = []
    real_fit = fc.fit_probe
    monkeypatch.setattr(fc, "fit_probe", lambda *a, **k: fits.append(1) or real_fit(*a, **k))
    second = Evaluator(tasks, base).evaluate({"merged": merged}, "test").to_json()
    assert calls == [] and fits == [] and second == first  # a second run (a new process) encodes and fits nothing


def test_features_are_keyed_by_tensors_not_file_bytes(tiny, tmp_path: Path, monkeypatch):
    """θ_shared = θ₀ is the base's tensors written again (other order, other metadata): the same features,
    read back; the same values in another dtype, or one value changed, are another encoder."""
    import shutil

    from safetensors.torch import load_file, save_file

    import merging.evaluation.feature_cache as fc

    monkeypatch.setenv("MERGEFLOW_CACHE_DIR", str(tmp_path / "cache"))
    _root, base, _fts, _tasks, _merged, _config = tiny
    calls: list[int] = []
    real = fc.encode
    monkeypatch.setattr(fc, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    texts = [" ".join(WORDS[i : i + 4]) for i in range(0, 40, 4)]
    first = fc.encode_cached(load_encoder(base), texts, 16, 4)
    tensors = load_file(str(base / "model.safetensors"))
    rewritten = tmp_path / "rewritten"
    shutil.copytree(base, rewritten)
    save_file(dict(reversed(list(tensors.items()))), str(rewritten / "model.safetensors"), {"written": "again"})
    assert (rewritten / "model.safetensors").read_bytes() != (base / "model.safetensors").read_bytes()
    assert torch.equal(fc.encode_cached(load_encoder(rewritten), texts, 16, 4), first) and calls == [1]
    # a merge writes θ₀'s -0.0 back as +0.0 (the same number): one encoder
    name = next(k for k in tensors if k.endswith("query.weight"))
    negative, positive = tmp_path / "negative-zero", tmp_path / "positive-zero"
    for folder, zero in ((negative, -0.0), (positive, 0.0)):
        shutil.copytree(base, folder)
        save_file(
            {**tensors, name: tensors[name].index_fill(0, torch.tensor([0]), zero)}, str(folder / "model.safetensors")
        )
    assert (negative / "model.safetensors").read_bytes() != (positive / "model.safetensors").read_bytes()
    assert fc.folder_digest(negative) == fc.folder_digest(positive)
    for label, change in (
        ("float64", lambda t: t.double()),
        ("one value", lambda t: t.index_fill(0, torch.tensor([0]), 0.5)),
    ):
        other = tmp_path / label.replace(" ", "-")
        shutil.copytree(base, other)
        save_file({**tensors, name: change(tensors[name]).contiguous()}, str(other / "model.safetensors"))
        assert fc.folder_digest(other) != fc.folder_digest(base), label
    damaged = tmp_path / "damaged"
    shutil.copytree(base, damaged)
    (damaged / "model.safetensors").write_bytes(b"not safetensors")
    assert fc.tensors_sha256(damaged / "model.safetensors").startswith("file:")


def test_probe_cache_returns_the_fit_and_misses_on_any_change(tmp_path: Path, monkeypatch):
    import merging.evaluation.feature_cache as fc

    monkeypatch.setenv("MERGEFLOW_CACHE_DIR", str(tmp_path / "cache"))
    fits: list[int] = []
    real = fc.fit_probe
    monkeypatch.setattr(fc, "fit_probe", lambda *a, **k: fits.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(0)
    x, xv = torch.randn(60, 8, generator=g), torch.randn(20, 8, generator=g)
    y, yv = (x[:, 0] > 0).long(), (xv[:, 0] > 0).long()
    head = fc.probe_cached(x, y, 2, xv, yv)
    again = fc.probe_cached(x.clone(), y.clone(), 2, xv, yv)
    assert fits == [1] and torch.equal(again.weight, head.weight) and torch.equal(again.bias, head.bias)
    fresh = real(x, y, 2, xv, yv)
    assert torch.equal(fresh.weight, head.weight)  # a hit is the fit's exact weights
    y2 = y.clone()
    y2[0] = 1 - y2[0]
    x2 = x.clone()
    x2[3, 4] += 1e-3
    for args in (
        (x, y2, 2, xv, yv),
        (x2, y, 2, xv, yv),
        (x, y, 3, xv, yv),
        (x, y, 2, None, None),
        (x, y, 2, xv, yv, 1),
    ):
        fc.probe_cached(*args)
    assert len(fits) == 6
    monkeypatch.setenv("MERGEFLOW_FEATURE_CACHE", "0")
    fc.probe_cached(x, y, 2, xv, yv)
    assert len(fits) == 7
