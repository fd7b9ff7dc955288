"""Counting the calls of a module's function in a test."""


def count_calls(monkeypatch, module, name: str) -> list:
    """A list that gets one entry per call of ``module.<name>`` (which still runs) while ``monkeypatch`` holds."""
    calls = []
    real = getattr(module, name)

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(module, name, counted)
    return calls
