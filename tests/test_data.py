"""Dataset fetch and preparation: every source kind, errors, EOS in the loss, packing, cache,
and packed attention == separate attention on real (tiny) models."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fixtures_data import review_rows, write_acl_imdb, write_rows
from loraflow.data import IGNORE_INDEX, PackedCollator, load_records, prepare_dataset
from loraflow.errors import ConfigError, DataError
from loraflow.settings import load_settings


def settings_for(source, **data):
    overrides = {"source": str(source), "max_length": 64}
    overrides.update(data)
    return load_settings(data=overrides)


def texts(ds) -> list[str]:
    return list(ds["text"])


# --------------------------------------------------------------------------- sources

@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet", ".txt"])
def test_single_file_every_format(tmp_path, data_home, suffix):
    rows = review_rows(40)
    path = write_rows(tmp_path / f"reviews{suffix}", rows)
    s = settings_for(path, eval_size=0.25)
    rec = load_records(s.data, s.storage, seed=7)
    assert len(rec["train"]) == 30 and len(rec["eval"]) == 10
    got = set(texts(rec["train"])) | set(texts(rec["eval"]))
    # <br /> became a newline (txt rows had newlines flattened by the writer)
    assert got == {r["text"].replace("<br />", "\n").strip() for r in rows}
    # deterministic: same seed -> same split; other seed -> other split
    again = load_records(s.data, s.storage, seed=7)
    assert texts(again["eval"]) == texts(rec["eval"])
    other = load_records(s.data, s.storage, seed=8)
    assert texts(other["eval"]) != texts(rec["eval"])


def test_train_test_folder_uses_file_stems(tmp_path, data_home):
    write_rows(tmp_path / "d" / "train.jsonl", review_rows(20, seed=1))
    write_rows(tmp_path / "d" / "test.jsonl", review_rows(6, seed=2))
    s = settings_for(tmp_path / "d")
    rec = load_records(s.data, s.storage)
    assert len(rec["train"]) == 20 and len(rec["eval"]) == 6
    assert texts(rec["eval"])[0] == review_rows(6, seed=2)[0]["text"].replace("<br />", "\n").strip()


def test_folder_without_split_names_is_train_and_gets_holdout(tmp_path, data_home):
    write_rows(tmp_path / "d" / "part-a.csv", review_rows(10, seed=1))
    write_rows(tmp_path / "d" / "part-b.csv", review_rows(10, seed=2))
    s = settings_for(tmp_path / "d", eval_size=0.1)
    rec = load_records(s.data, s.storage)
    assert len(rec["train"]) == 18 and len(rec["eval"]) == 2


def test_acl_imdb_layout(tmp_path, data_home):
    root = write_acl_imdb(tmp_path / "imdb", rows_per_label=4)
    s = settings_for(root)
    rec = load_records(s.data, s.storage)
    # train = pos + neg (unsup is its own split, as on the hub), eval = test split
    assert len(rec["train"]) == 8 and len(rec["eval"]) == 8
    assert all("<br" not in t for t in texts(rec["train"]))
    s = settings_for(root, train_split="unsupervised")
    assert len(load_records(s.data, s.storage)["train"]) == 4


def test_sample_limits_are_deterministic(tmp_path, data_home):
    write_rows(tmp_path / "d" / "train.jsonl", review_rows(50, seed=1))
    write_rows(tmp_path / "d" / "test.jsonl", review_rows(20, seed=2))
    s = settings_for(tmp_path / "d", max_train_samples=7, max_eval_samples=3)
    a = load_records(s.data, s.storage, seed=1)
    b = load_records(s.data, s.storage, seed=1)
    assert len(a["train"]) == 7 and len(a["eval"]) == 3
    assert texts(a["train"]) == texts(b["train"])


def test_text_column_is_configurable(tmp_path, data_home):
    rows = [{"review": r["text"], "stars": 3} for r in review_rows(10)]
    path = write_rows(tmp_path / "r.jsonl", rows)
    s = settings_for(path, text_column="review")
    rec = load_records(s.data, s.storage)
    assert rec["train"].column_names == ["text"] and len(rec["train"]) + len(rec["eval"]) == 10


@pytest.fixture
def s3_endpoint(request, tmp_path):
    """The shared `s3_server` fixture when it exists, else a private `rclone serve s3`."""
    try:
        server = request.getfixturevalue("s3_server")
        return server.endpoint_url
    except pytest.FixtureLookupError:
        pass
    rclone = shutil.which("rclone") or str(Path(sys.executable).parent / "rclone")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = tmp_path / "s3root"
    root.mkdir()
    proc = subprocess.Popen([rclone, "serve", "s3", str(root), "--addr", f"127.0.0.1:{port}",
                             "--auth-key", f"{os.environ['AWS_ACCESS_KEY_ID']},{os.environ['AWS_SECRET_ACCESS_KEY']}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    request.addfinalizer(lambda: (proc.terminate(), proc.wait(10)))
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    return f"http://127.0.0.1:{port}"


def test_s3_prefix_is_mirrored_and_pruned(tmp_path, data_home, s3_endpoint):
    from loraflow.storage.client import make_client

    storage = {"endpoint_url": s3_endpoint}
    bucket = f"data-{time.time_ns()}"
    s = load_settings(data={"source": f"s3://{bucket}/imdb/", "max_length": 64}, storage=storage)
    client = make_client(s.storage)
    client.create_bucket(Bucket=bucket)
    train = write_rows(tmp_path / "up" / "train.parquet", review_rows(12, seed=1))
    test = write_rows(tmp_path / "up" / "test.parquet", review_rows(4, seed=2))
    client.upload_file(str(train), bucket, "imdb/train.parquet")
    client.upload_file(str(test), bucket, "imdb/test.parquet")
    rec = load_records(s.data, s.storage)
    assert len(rec["train"]) == 12 and len(rec["eval"]) == 4

    # An object removed from the bucket must not linger in the local mirror.
    client.delete_object(Bucket=bucket, Key="imdb/test.parquet")
    rec = load_records(s.data, s.storage)
    assert len(rec["train"]) + len(rec["eval"]) == 12

    # A single object works too.
    s1 = load_settings(data={"source": f"s3://{bucket}/imdb/train.parquet", "max_length": 64}, storage=storage)
    assert sum(len(v) for v in load_records(s1.data, s1.storage).values()) == 12

    # A CSV edited in place at the same size is fetched again (ETag, not size): the records, and so
    # the dataset fingerprint, follow the bucket.
    s2 = load_settings(data={"source": f"s3://{bucket}/csv/", "max_length": 64}, storage=storage)
    filler = "".join(f"review number {i:02d}\n" for i in range(20)).encode()

    def texts() -> list[str]:
        rec = load_records(s2.data, s2.storage)
        return list(rec["train"]["text"]) + list(rec["eval"]["text"])

    client.put_object(Bucket=bucket, Key="csv/train.csv", Body=b"text\nthe film was good\n" + filler)
    assert "the film was good" in texts()
    client.put_object(Bucket=bucket, Key="csv/train.csv", Body=b"text\nthe film was fine\n" + filler)
    assert "the film was fine" in texts() and "the film was good" not in texts()


# --------------------------------------------------------------------------- errors

def _missing(tmp):
    return tmp / "nope.jsonl"


def _no_text_column(tmp):
    return write_rows(tmp / "r.jsonl", [{"review": "x", "stars": 1}] * 4)


def _all_empty(tmp):
    return write_rows(tmp / "r.jsonl", [{"text": "  "}, {"text": "<br /><br />"}, {"text": None}])


def _empty_csv(tmp):
    path = tmp / "empty.csv"
    path.write_text("text,label\n")
    return path


def _broken_jsonl(tmp):
    path = tmp / "broken.jsonl"
    path.write_text('{"text": "fine"}\n{"text": oops not json\n')
    return path


def _pickle_in_folder(tmp):
    write_rows(tmp / "d" / "train.jsonl", review_rows(4))
    (tmp / "d" / "weights.pkl").write_bytes(b"\x80\x04")
    return tmp / "d"


@pytest.mark.parametrize("make_source, message", [
    (_missing, "no such file or folder.*nope.jsonl"),
    (_no_text_column, r"no text column 'text'.*data.text_column.*review, stars"),
    (_all_empty, r"r.jsonl.*every value of column 'text' is empty"),
    (_empty_csv, r"empty.csv.*empty"),
    (_broken_jsonl, r"cannot read .*broken.jsonl"),
    (_pickle_in_folder, r"unsupported file type '.pkl'.*weights.pkl"),
], ids=["missing-path", "missing-text-column", "all-empty-texts", "empty-dataset", "unreadable-file",
        "unsupported-file-type"])
def test_bad_sources_are_clear_errors_naming_file_and_field(tmp_path, data_home, make_source, message):
    s = settings_for(make_source(tmp_path))
    with pytest.raises(DataError, match=message):
        load_records(s.data, s.storage)


def test_error_max_length_above_model_context(tmp_path, data_home, gpt2_tok):
    path = write_rows(tmp_path / "r.jsonl", review_rows(6))
    s = settings_for(path, max_length=2048)
    with pytest.raises(ConfigError, match=r"data.max_length=2048 .*1024"):
        prepare_dataset(s, gpt2_tok, model_max_positions=1024)


# --------------------------------------------------------------------------- tokenisation, packing, cache

@pytest.fixture
def review_file(tmp_path):
    return write_rows(tmp_path / "reviews.jsonl", review_rows(60, seed=5))


def _documents(prepared):
    """Split rows back into documents (lists of ids) using the position-id restarts."""
    docs = []
    for row in prepared:
        for tok, pos in zip(row["input_ids"], row["position_ids"]):
            if pos == 0:
                docs.append([])
            docs[-1].append(tok)
    return docs


@pytest.mark.parametrize("packing", [True, False])
def test_rows_keep_every_token_and_restart_positions(review_file, data_home, gpt2_tok, packing):
    s = settings_for(review_file, max_length=48, packing=packing)
    p = prepare_dataset(s, gpt2_tok, model_max_positions=1024)
    eos = gpt2_tok.eos_token_id
    rec = load_records(s.data, s.storage, seed=s.training.seed)
    for split in ("train", "eval"):
        rows = p.train if split == "train" else p.eval
        assert all(len(r["input_ids"]) <= 48 for r in rows)
        assert all(len(r["input_ids"]) == len(r["position_ids"]) for r in rows)
        # Re-joining the chunks of each document gives back its tokens + EOS, none lost.
        expected = sorted(gpt2_tok(t)["input_ids"] + [eos] for t in texts(rec[split]))
        chunks = _documents(rows)
        assert all(c[-1] == eos or len(c) == 48 for c in chunks)  # EOS only at a true end
        assert sum(len(c) for c in chunks) == sum(len(e) for e in expected) == p.stats[split]["tokens"]
        assert sum(c.count(eos) for c in chunks) == len(expected) == p.stats[split]["documents"]
    if packing:
        assert p.stats["train"]["rows"] < p.stats["train"]["chunks"]  # several documents per row
        assert any(r["position_ids"].count(0) > 1 for r in p.train)
    else:
        assert p.stats["train"]["rows"] == p.stats["train"]["chunks"]


def test_collator_labels_keep_eos_and_mask_padding(review_file, data_home, gpt2_tok):
    s = settings_for(review_file, max_length=64, packing=False)
    p = prepare_dataset(s, gpt2_tok)
    eos = gpt2_tok.eos_token_id
    rows = [p.train[i] for i in range(4)]
    batch = PackedCollator(pad_token_id=eos, pad_to_multiple_of=8)(rows)
    assert set(batch) == {"input_ids", "position_ids", "labels"}  # no attention_mask
    assert batch["input_ids"].shape[1] % 8 == 0
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        if row["input_ids"][-1] == eos:
            assert batch["labels"][i, n - 1] == eos  # EOS is a target
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()  # padding (also eos-valued) is not
        assert (batch["input_ids"][i, n:] == eos).all()
        assert batch["position_ids"][i, n:].tolist() == list(range(batch["input_ids"].shape[1] - n))


def test_fingerprint_cache_hit_and_miss(review_file, data_home, gpt2_tok, caplog):
    s = settings_for(review_file, max_length=64)
    first = prepare_dataset(s, gpt2_tok)
    assert not first.from_cache and first.cache_dir.parent == data_home / "prepared"
    with caplog.at_level("INFO", logger="loraflow"):
        again = prepare_dataset(s, gpt2_tok)
    assert again.from_cache and again.fingerprint == first.fingerprint
    assert "from cache" in caplog.text
    assert again.train["input_ids"] == first.train["input_ids"]
    assert again.stats["eval_fingerprint"] == first.stats["eval_fingerprint"]

    longer = prepare_dataset(settings_for(review_file, max_length=96), gpt2_tok)
    assert not longer.from_cache and longer.fingerprint != first.fingerprint
    assert longer.stats["eval_fingerprint"] != first.stats["eval_fingerprint"]
    # Packing changes the rows but not what the eval loss is computed on.
    unpacked = prepare_dataset(settings_for(review_file, max_length=64, packing=False), gpt2_tok)
    assert unpacked.fingerprint != first.fingerprint
    assert unpacked.stats["eval_fingerprint"] == first.stats["eval_fingerprint"]
    # Changed content -> new fingerprint, even at the same path.
    write_rows(review_file, review_rows(60, seed=6))
    assert prepare_dataset(s, gpt2_tok).fingerprint != first.fingerprint
    assert sorted(p.name for p in (data_home / "prepared").iterdir() if not p.name.startswith(".")) \
        == sorted({first.fingerprint, longer.fingerprint, unpacked.fingerprint,
                   prepare_dataset(s, gpt2_tok).fingerprint})


# --------------------------------------------------------------------------- packed attention

def _tiny_llama(tmp_path_factory=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=50256, bos_token_id=50256)
    return LlamaForCausalLM(cfg)


@pytest.fixture(params=["gpt2", "llama"])
def tiny_lm(request, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    if request.param == "gpt2":
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    else:
        model = _tiny_llama()
    assert model.config._attn_implementation == "sdpa"
    return model.eval()


def test_packed_rows_equal_documents_run_alone(review_file, data_home, gpt2_tok, tiny_lm):
    s = settings_for(review_file, max_length=96)
    p = prepare_dataset(s, gpt2_tok)
    rows = [r for r in p.train if r["position_ids"].count(0) >= 3][:2]
    assert len(rows) == 2
    rows.append(min(p.train, key=lambda r: len(r["input_ids"])))  # a short row -> padding in the batch
    batch = PackedCollator(pad_token_id=gpt2_tok.eos_token_id)(rows)
    with torch.no_grad():
        out = tiny_lm(**batch, use_cache=False)
        packed_logits = out.logits
        total_loss, total_targets = 0.0, 0
        for i, row in enumerate(rows):
            starts = [j for j, pos in enumerate(row["position_ids"]) if pos == 0] + [len(row["input_ids"])]
            for a, b in zip(starts, starts[1:]):
                ids = torch.tensor([row["input_ids"][a:b]])
                alone = tiny_lm(input_ids=ids, labels=ids, use_cache=False)
                torch.testing.assert_close(packed_logits[i, a:b], alone.logits[0], atol=1e-4, rtol=1e-4)
                if b - a > 1:  # a one-token chunk has nothing to predict (its loss is NaN)
                    total_loss += alone.loss.item() * (b - a - 1)
                    total_targets += b - a - 1
    # The packed batch's mean loss is the token-weighted mean of the documents' own losses:
    # no target is predicted across a document boundary.
    assert (batch["labels"] != IGNORE_INDEX).sum().item() == total_targets
    assert out.loss.item() == pytest.approx(total_loss / total_targets, rel=1e-4)


def test_attention_crosses_documents_when_the_kv_cache_is_on(review_file, data_home, gpt2_tok, tiny_model_dir):
    """Why FORWARD_KWARGS exists: with config.use_cache=True (GPT-2's default) transformers 5.24
    skips packed-sequence detection, so later documents in a row see earlier ones. Trainer sets
    config.use_cache=False; a hand-written loop must pass use_cache=False."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    p = prepare_dataset(settings_for(review_file, max_length=96), gpt2_tok)
    row = next(r for r in p.train if r["position_ids"].count(0) >= 2)
    starts = [j for j, pos in enumerate(row["position_ids"]) if pos == 0] + [len(row["input_ids"])]
    a, b = starts[1], starts[2]  # the second document of the row
    batch = PackedCollator(pad_token_id=gpt2_tok.eos_token_id)([row])
    with torch.no_grad():
        alone = model(input_ids=batch["input_ids"][:, a:b]).logits
        model.config.use_cache = True
        leaky = model(**batch).logits[0, a:b]
        model.config.use_cache = False  # what Trainer does
        fine = model(**batch).logits[0, a:b]
    assert not torch.allclose(leaky, alone[0], atol=1e-3)
    torch.testing.assert_close(fine, alone[0], atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- hub, helpers, real reviews

def test_hub_id_offline_is_a_clear_error(data_home):
    s = load_settings(data={"source": "imdb"})  # the seed's dataset; conftest makes the hub offline
    with pytest.raises(DataError, match=r"data.source: cannot load hub dataset imdb"):
        load_records(s.data, s.storage)


def test_source_validation_split_used_when_eval_split_missing(tmp_path, data_home):
    write_rows(tmp_path / "d" / "train.csv", review_rows(10, seed=1))
    write_rows(tmp_path / "d" / "validation.csv", review_rows(3, seed=2))
    s = settings_for(tmp_path / "d")  # eval_split defaults to "test"
    rec = load_records(s.data, s.storage)
    assert len(rec["train"]) == 10 and len(rec["eval"]) == 3


def test_model_context_length(tiny_model_dir):
    from transformers import AutoConfig, LlamaConfig

    from loraflow.data import model_context_length

    assert model_context_length(AutoConfig.from_pretrained(tiny_model_dir)) == 1024
    assert model_context_length(LlamaConfig(max_position_embeddings=2048)) == 2048


def test_real_reviews_pack_tightly(imdb_data_dir, data_home, gpt2_tok):
    s = settings_for(imdb_data_dir, max_length=512)
    packed = prepare_dataset(s, gpt2_tok, model_max_positions=1024)
    seed_layout = prepare_dataset(settings_for(imdb_data_dir, max_length=512, packing=False), gpt2_tok)
    st, su = packed.stats["train"], seed_layout.stats["train"]
    assert st["documents"] == su["documents"] == 200 and packed.stats["eval"]["documents"] == 200
    assert st["tokens"] == su["tokens"] > 200 * 100
    assert st["fill"] > 0.9 and su["fill"] < 0.75  # most of the seed's rows would be padding
    assert st["rows"] < su["rows"]
    eos = gpt2_tok.eos_token_id
    assert sum(r["input_ids"].count(eos) for r in packed.train) == 200
    assert "<br" not in gpt2_tok.decode([t for r in packed.train for t in r["input_ids"]])


def test_saved_dataset_folder_and_metadata_files(tmp_path, data_home):
    import datasets

    saved = tmp_path / "saved"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list(review_rows(8, seed=1)),
        "test": datasets.Dataset.from_list(review_rows(2, seed=2)),
    }).save_to_disk(str(saved))
    s = settings_for(saved)
    rec = load_records(s.data, s.storage)
    assert len(rec["train"]) == 8 and len(rec["eval"]) == 2

    # A folder's metadata (the demo assets' record, a README) is not read as data.
    plain = tmp_path / "plain"
    write_rows(plain / "reviews.jsonl", review_rows(10, seed=1))
    (plain / "loraflow-assets.json").write_text(json.dumps({"source": "x"}))
    (plain / "README.md").write_text("# reviews\n")
    rec = load_records(settings_for(plain).data, s.storage)
    assert len(rec["train"]) + len(rec["eval"]) == 10
