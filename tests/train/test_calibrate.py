"""Refusal calibration: the bias chosen on val margins, and the engine's greedy decision under it."""

from __future__ import annotations

import json

import pytest

from sovllm.errors import AdapterError
from sovllm.models.adapter import RefusalCalibration, inspect_adapter
from sovllm.models.grounding import Vocabulary
from sovllm.models.prompt import split_user_message
from sovllm.train.calibrate import choose_bias, choose_weight, choose_weights, margins, rates


def test_the_bias_refuses_the_most_unanswerable_items_within_the_false_refusal_allowance():
    # worked by hand: 10 answerable margins, 10 % may be refused -> one (the 1.0); the 0.5 must stay
    # answered, so the threshold lies between 0.5 and the lowest margin above it (0.6): 0.55, bias -0.55
    answerable = [1.0, 0.5, 0.0, -0.2, -1.0, -1.5, -2.0, -2.5, -3.0, -4.0]
    unanswerable = [2.0, 0.8, 0.6, -0.1]
    bias = choose_bias(unanswerable, answerable, 0.10)
    assert bias == pytest.approx(-0.55)
    assert rates(unanswerable, answerable, bias) == {"refusal_accuracy": 0.75, "false_refusals": 0.1,
                                                     "refused_unanswerable": 3, "refused_answerable": 1}
    # no false refusal allowed: the 1.0 stays answered too, threshold midway to 2.0
    assert choose_bias(unanswerable, answerable, 0.0) == pytest.approx(-1.5)
    # a looser allowance may also move the threshold down, refusing more than greedy (bias > 0)
    loose = choose_bias(unanswerable, answerable, 0.3)  # three may be refused: 1.0, 0.5, 0.0; -0.2 stays
    assert loose == pytest.approx(0.15)
    assert rates(unanswerable, answerable, loose)["refused_unanswerable"] == 4


def test_a_val_split_that_cannot_be_separated_refuses_nothing():
    bias = choose_bias([-3.0, -2.0], [1.0, 0.0], 0.0)
    assert rates([-3.0, -2.0], [1.0, 0.0], bias)["refused_answerable"] == 0
    assert rates([-3.0, -2.0], [1.0, 0.0], bias)["refused_unanswerable"] == 0
    with pytest.raises(ValueError):
        choose_bias([], [1.0], 0.1)


def test_the_bias_applies_only_while_the_answer_is_the_refusals_beginning():
    torch = pytest.importorskip("torch")
    calibration = RefusalCalibration([5, 7], -2.0)
    for generated, changed in (([], 5), ([5], 7), ([6], None), ([5, 7], None), ([5, 8], None)):
        logits = torch.zeros(10)
        calibration.apply(logits, generated, calibration.bias)
        expected = torch.zeros(10)
        if changed is not None:
            expected[changed] = -2.0
        assert torch.equal(logits, expected), generated


def test_lexical_support_weighs_the_questions_words_by_their_rarity_in_the_training_contexts():
    import math

    contexts = ["The VPN client Tunnelwerk needs a FIDO2 key.", "The travel policy covers trains.",
                "The VPN is mandatory on travel."]
    vocabulary = Vocabulary.from_contexts(contexts + contexts[:1])  # duplicates count once
    assert vocabulary.documents == 3 and vocabulary.df["the"] == 3 and vocabulary.df["vpn"] == 2
    assert vocabulary.idf("the") == 0.0 and vocabulary.idf("unseen") == pytest.approx(math.log(4))
    # worked by hand: "which", "does", "need" are unseen (idf log 4 each), "fido2", "key", "tunnelwerk"
    # occur in one context (log 2 each) and all three in the first: 3 log 2 / (3 log 4 + 3 log 2)
    question = "Which FIDO2 key does Tunnelwerk need?"
    expected = 3 * math.log(2) / (3 * math.log(4) + 3 * math.log(2))
    assert vocabulary.support(contexts[0], question) == pytest.approx(expected)
    assert vocabulary.support(contexts[1], question) == 0.0
    assert vocabulary.support(contexts[1], "The a?") == 1.0  # nothing informative to check
    assert vocabulary.support("Die Reiserichtlinie gilt für Züge.", "Gilt die Reiserichtlinie für Züge?") == 1.0


def test_line_support_is_the_share_within_the_best_line():
    contexts = ["Canteen\nThe canteen opens at 7:00.\nLunch costs 4.20 euro.", "VPN needs a FIDO2 key.",
                "Travel by train is covered."]
    vocabulary = Vocabulary.from_contexts(contexts)
    # every word of the question is in the context, but no line holds both "canteen" and "lunch"
    spread = "Canteen\nThe canteen opens at 7:00.\nLunch is served."
    question = "When does canteen lunch start?"
    assert vocabulary.support(spread, question) > vocabulary.line_support(spread, question) > 0
    together = "Canteen\nCanteen lunch starts at 11:30."
    assert vocabulary.line_support(together, question) == pytest.approx(vocabulary.support(together, question))
    assert vocabulary.line_support("", question) == 0.0
    assert vocabulary.line_support(spread, "The a?") == 1.0  # nothing informative to check


def test_the_training_user_turn_is_read_back_and_other_turns_get_no_bias():
    from sovllm.models.prompt import user_message

    turn = user_message([{"text": "Passwords rotate every 90 days.", "heading_path": ["IT policy"]}],
                        " How often do passwords rotate? ")
    assert split_user_message(turn) == ("[1] IT policy\nPasswords rotate every 90 days.", "How often do passwords rotate?")
    calibration = RefusalCalibration([4, 9], 1.5, 0.1, {}, 2.0, Vocabulary.from_contexts(["Passwords rotate.", "VPN."]))
    support = calibration.vocabulary.support(*split_user_message(turn))
    assert 0 < support < 1 and calibration.bias_for(turn) == pytest.approx(1.5 - 2.0 * support)
    for other in ("Hello", "Question: only a question", None):
        assert calibration.bias_for(other) is None
    assert RefusalCalibration([4, 9], 1.5).bias_for(turn) == 1.5
    both = RefusalCalibration([4, 9], 1.5, 0.1, {}, 2.0, calibration.vocabulary, 3.0)
    line = both.vocabulary.line_support(*split_user_message(turn))
    assert both.bias_for(turn) == pytest.approx(1.5 - 2.0 * support - 3.0 * line)
    again = RefusalCalibration.from_dict(both.as_dict())
    assert again.line_weight == 3.0 and again.bias_for(turn) == pytest.approx(both.bias_for(turn))
    assert again.describe() == "+1.50 - 2 x lexical support - 3 x line support"
    old = both.as_dict()
    del old["support"]["line_weight"]  # a manifest written before line support: no line term
    assert RefusalCalibration.from_dict(old).bias_for(turn) == pytest.approx(1.5 - 2.0 * support)


def test_the_support_weight_is_chosen_where_val_separates_best():
    # the margins alone cannot separate (an unanswerable item sits at the answerable ones' level),
    # the support can: the weight must rise until every unanswerable item is refused, no further
    margins_u, support_u = [1.0, -2.0], [0.1, 0.0]
    margins_a, support_a = [0.0, -1.0, -2.5], [1.0, 0.9, 0.8]
    weight = choose_weight(margins_u, margins_a, support_u, support_a, 0.0)
    scored_u = [m - weight * s for m, s in zip(margins_u, support_u)]
    scored_a = [m - weight * s for m, s in zip(margins_a, support_a)]
    assert min(scored_u) > max(scored_a)
    assert rates(scored_u, scored_a, choose_bias(scored_u, scored_a, 0.0))["refused_unanswerable"] == 2
    assert choose_weight([1.0], [0.0], [0.5], [0.5], 0.0) == 0.0  # the support adds nothing: no weight


def test_the_line_weight_is_chosen_where_whole_context_support_cannot_separate():
    # two on-topic items keep all their words in the context (support 1.0, as the answerable ones),
    # but no line holds most of them; only the line support separates them
    margins_u, features_u = [0.0, -0.5], [(1.0, 0.3), (1.0, 0.4)]
    margins_a, features_a = [0.5, -1.0, 0.2], [(1.0, 0.9), (1.0, 1.0), (0.9, 0.8)]
    weights = choose_weights(margins_u, margins_a, features_u, features_a, 0.0)
    assert weights[1] > 0
    scored_u = [m - sum(w * f for w, f in zip(weights, fs)) for m, fs in zip(margins_u, features_u)]
    scored_a = [m - sum(w * f for w, f in zip(weights, fs)) for m, fs in zip(margins_a, features_a)]
    assert min(scored_u) > max(scored_a)


def test_a_malformed_calibration_in_the_manifest_is_an_adapter_error(tiny_model_dir, tmp_path):
    from sovllm.models.tiny import make_random_adapter

    path = make_random_adapter(tiny_model_dir, tmp_path / "a", rank=2, target_modules=("q_proj",), seed=3)
    manifest = path / "manifest.json"
    data = json.loads(manifest.read_text()) if manifest.is_file() else {}
    manifest.write_text(json.dumps({**data, "refusal_calibration": {"token_ids": [], "bias": 1.0}}))
    with pytest.raises(AdapterError, match="refusal_calibration: token_ids"):
        inspect_adapter(path)
    for support in ({"weight": -1, "documents": 3, "df": {}}, {"weight": 2, "documents": 3, "df": {"x": 4}},
                    {"weight": 2, "df": {}}, [1, 2]):
        manifest.write_text(json.dumps({**data, "refusal_calibration": {"token_ids": [4, 9], "bias": 1.0,
                                                                        "support": support}}))
        with pytest.raises(AdapterError, match="refusal_calibration: support must hold"):
            inspect_adapter(path)
    manifest.write_text(json.dumps({**data, "refusal_calibration": {"token_ids": [4, 9], "bias": -1.25}}))
    assert inspect_adapter(path).refusal == RefusalCalibration([4, 9], -1.25)
    calibration = RefusalCalibration([4, 9], -1.25, 0.1, {}, 3.0, Vocabulary(3, {"vpn": 1, "the": 3}))
    manifest.write_text(json.dumps({**data, "refusal_calibration": calibration.as_dict()}))
    assert inspect_adapter(path).refusal == calibration


def test_engine_greedy_refuses_exactly_when_margin_plus_bias_is_non_negative(tiny_model_dir, tmp_path):
    """The margins computed teacher-forced predict the engine's greedy first tokens under any bias."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sovllm.models.tiny import make_random_adapter
    from sovllm.models.tokenizer import load_tokenizer
    from sovllm.serve.engine import Engine
    from tests.serve.conftest import submit

    tokenizer = load_tokenizer(tiny_model_dir)
    adapter = make_random_adapter(tiny_model_dir, tmp_path / "a", rank=4, target_modules=("q_proj", "v_proj"),
                                  seed=5)
    texts = ["Passwords rotate every", "Die Urlaubsanträge werden", "The incident runbook says: page the on-call",
             "Question: What is the refund window?"]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32),
                                      str(adapter))
    engine = Engine(tiny_model_dir, tokenizer, max_num_seqs=4, threads=1)
    engine.start()
    try:
        engine.load_adapter("plain", adapter)
        # the "refusal": the adapter's own greedy first two tokens after the first prompt
        tokens = submit(engine, prompts[0], "plain", max_tokens=2, temperature=0, ignore_eos=True).wait().tokens()
        values = margins(model, prompts, tokens, pad_id=tokenizer.pad_token_id)
        assert values[0] >= 0
        engine.load_adapter("calibrated", adapter, RefusalCalibration(tokens, 0.0))
        for p, m in enumerate(values):
            for bias in (-m - 0.05, -m + 0.05):  # each request carries its own bias
                got = submit(engine, prompts[p], "calibrated", refusal_bias=bias, max_tokens=2, temperature=0,
                             ignore_eos=True).wait().tokens()
                assert (got == tokens) == (m + bias >= 0), (p, m, bias, got, tokens)
            # no bias for the request (not in the training format): the raw adapter's greedy choice
            got = submit(engine, prompts[p], "calibrated", max_tokens=2, temperature=0, ignore_eos=True).wait().tokens()
            assert (got == tokens) == (m >= 0), (p, m, got)
    finally:
        engine.shutdown()


def test_eval_caches_answers_per_bias_and_reports_it(tiny_model_dir, tmp_path):
    """Same weights, another bias: other answers, so the answer cache must not reuse them."""
    from sovllm.evaluate.stage import adapter_fingerprint, refusal_summary
    from sovllm.models.tiny import make_random_adapter

    path = make_random_adapter(tiny_model_dir, tmp_path / "a", rank=2, target_modules=("q_proj",), seed=3)
    raw = adapter_fingerprint(path, "base")
    assert refusal_summary(path)["refusal_bias"] is None
    manifest = path / "manifest.json"
    data = json.loads(manifest.read_text())
    fingerprints = set()
    for bias in (-1.25, 0.5):
        manifest.write_text(json.dumps({**data, "refusal_calibration": {"token_ids": [4, 9], "bias": bias}}))
        fingerprints.add(adapter_fingerprint(path, "base"))
        assert refusal_summary(path)["refusal_bias"] == bias
    # the support term decides answers too: its weight and its document frequencies
    for weight, df in ((2.0, {"vpn": 1}), (3.0, {"vpn": 1}), (3.0, {"vpn": 2})):
        calibration = RefusalCalibration([4, 9], 0.5, 0.1, {}, weight, Vocabulary(3, df))
        manifest.write_text(json.dumps({**data, "refusal_calibration": calibration.as_dict()}))
        fingerprints.add(adapter_fingerprint(path, "base"))
    assert len(fingerprints | {raw}) == 6


def test_margins_of_questions_on_a_shared_context_equal_those_asked_alone(tiny_model_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sovllm.models.tiny import make_random_adapter
    from sovllm.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    adapter = make_random_adapter(tiny_model_dir, tmp_path / "a", rank=4, target_modules=("q_proj", "v_proj"), seed=8)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32),
                                      str(adapter))
    context = "Context: Passwords must have at least 14 characters and are rotated every 180 days.\n\nQuestion: "
    questions = ["How long must a password be?", "When are passwords rotated?", "Wer genehmigt Urlaub?"]
    prompts = [tokenizer(context + q, add_special_tokens=False)["input_ids"] for q in questions]
    prompts.append(tokenizer("Question: What is the refund window?", add_special_tokens=False)["input_ids"])
    keys = [context, context, context, None]
    tokens = tokenizer("The answer", add_special_tokens=False)["input_ids"][:2]
    alone = margins(model, prompts, tokens, pad_id=tokenizer.pad_token_id)
    shared = margins(model, prompts, tokens, pad_id=tokenizer.pad_token_id, share_keys=keys)
    assert len(set(round(v, 3) for v in alone)) == 4  # four different decisions, not one value repeated
    assert shared == pytest.approx(alone, abs=1e-4)


def test_val_questions_are_also_asked_about_another_val_documents_context():
    """More unanswerable calibration items, built as curate builds them: another document's context, the
    most overlapping one that shares at most max_overlap of the question's content words."""
    from sovllm.config import PromptSection
    from sovllm.curate.records import make_record
    from sovllm.train.calibrate import foreign_val_records

    prompt = PromptSection()
    chunk = lambda i, doc, text: {"id": f"{doc}-{i}", "doc_id": doc, "text": text, "heading_path": [doc]}  # noqa: E731
    vpn = chunk(0, "it", "The VPN client Tunnelwerk needs a FIDO2 key; passwords rotate every 90 days.")
    travel = chunk(0, "hr", "Travel by train is reimbursed in second class; the VPN is not needed for expenses.")
    leave = chunk(1, "hr", "Parental leave is requested in Kompass eight weeks ahead.")
    records = [make_record("q1", prompt=prompt, contexts=[vpn], question="Which key does the VPN client need?",
                           answer="A FIDO2 key.", chunk=vpn, type_="factual"),
               make_record("q2", prompt=prompt, contexts=[travel], question="Which class is reimbursed for trains?",
                           answer="Second class.", chunk=travel, type_="factual"),
               make_record("q3", prompt=prompt, contexts=[leave], question="How early is parental leave requested?",
                           answer="Eight weeks ahead.", chunk=leave, type_="factual"),
               make_record("n1", prompt=prompt, contexts=[vpn], question="How early is parental leave requested?",
                           answer=prompt.refusal, chunk=vpn, type_="unanswerable")]
    out = {r["id"]: r for r in foreign_val_records(records, prompt.refusal, max_overlap=0.5)}
    assert set(out) == {"q1-calibration-foreign", "q2-calibration-foreign", "q3-calibration-foreign"}
    for record in out.values():
        assert record["meta"]["type"] == "unanswerable" and record["messages"][2]["content"] == prompt.refusal
        assert record["messages"][0] == records[0]["messages"][0]  # the same system prompt
    context = lambda r: split_user_message(r["messages"][1]["content"])[0]  # noqa: E731
    # q1 (VPN, document "it"): both hr contexts are foreign; the travel one shares "vpn" (1 of the 4 content
    # words key, vpn, client, need), the leave one none: the harder one is chosen
    assert "Travel by train" in context(out["q1-calibration-foreign"])
    # q2 and q3 (document "hr") can only be asked about the VPN context
    assert "Tunnelwerk" in context(out["q2-calibration-foreign"]) and "Tunnelwerk" in context(out["q3-calibration-foreign"])
    strict = {r["id"]: r for r in foreign_val_records(records, prompt.refusal, max_overlap=0.0)}
    assert "Parental leave" in context(strict["q1-calibration-foreign"])  # 1/4 > 0: travel is excluded
    single = [r for r in records if r["meta"]["doc_id"] == "hr"]
    assert foreign_val_records(single, prompt.refusal, max_overlap=0.5) == []  # one document: nothing to pair
