import pytest

from scratchlm.tokenizer import DEFAULT_HUB_ID, ENV_VAR, TokenizerNotFound, load_tokenizer


def test_vocabulary_and_known_ids(tokenizer):
    assert tokenizer.vocab_size == 50295
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.encode("<|endoftext|>") == [50256]
    assert tokenizer.eot_id == 50256
    code = "def f():\n        return 1\n\t\treturn 2"
    assert tokenizer.encode(code) == [4299, 277, 33529, 198, 50280, 7783, 352, 198, 50294, 7783, 362]


def test_batch_encoding_round_trips(tokenizer, corpus_dir):
    text = (corpus_dir / "code" / "python_flask.txt").read_text()[:20000]
    texts = [text[i : i + 997] for i in range(0, len(text), 997)] + ["", "naïve café — 東京 \t\n  x"]
    batch = tokenizer.encode_batch(texts)
    assert [tokenizer.encode(t) for t in texts] == batch
    assert tokenizer.decode_batch(batch) == texts


def test_missing_tokenizer_names_variable_and_hub_id(tmp_path, monkeypatch):
    # The hub cannot be reached here; HF_HUB_OFFLINE makes that failure immediate instead of a network
    # timeout.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(TokenizerNotFound) as err:
        load_tokenizer()
    assert ENV_VAR in str(err.value) and DEFAULT_HUB_ID in str(err.value)
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(TokenizerNotFound, match=ENV_VAR):
        load_tokenizer()
