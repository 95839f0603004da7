"""The private upstream hooks lmforge relies on keep the signatures it was written against."""

from lmforge.compat import PRIVATE_HOOKS, attention_registered, hook_problems


def test_every_private_hook_has_the_expected_signature():
    assert hook_problems() == []
    assert len(PRIVATE_HOOKS) == 11


def test_a_changed_signature_is_reported(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers.Trainer, "_get_output_dir", lambda self, trial, extra: None)
    problems = hook_problems()
    assert len(problems) == 1 and "_get_output_dir" in problems[0] and "('trial', 'extra')" in problems[0]


def test_attention_registry_is_readable():
    assert attention_registered("sdpa") and not attention_registered("no_such_attention")
