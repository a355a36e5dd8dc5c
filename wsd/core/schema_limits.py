"""The bounds of data validation, shared by ``wsd.core.schema`` and its validator (no imports: cheap to load)."""

MAX_REASON_CHARS = 200  # a refusal's reason is cut here: it may quote the offending value
VALIDATION_BUDGET_S = 0.25  # one validation of one publication's data may take this long, then it is refused
OVER_BUDGET = (f"validating took longer than {VALIDATION_BUDGET_S * 1000:g} ms: the data is too large or too "
               "complex for the schema")  # the reason of a refusal that cost the whole budget
