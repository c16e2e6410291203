"""LLM judge: best/worst selection by a strong model behind any OpenAI-compatible endpoint.

Selected with ``judge.backend: llm`` (:func:`pipeline.judging.registry.get_judge`); settings in
``judge.llm`` (:class:`pipeline.settings.judge.LLMJudgeParams`). Modules, by job:

- :mod:`.templates`: the prompts (the rubric) and their version and hash, part of every cache key;
- :mod:`.parsing`: strict parsing of the judge's answers and the JSON schemas requested;
- :mod:`.client`: the HTTP side (requests, the ``openai`` client, retries, concurrency, usage);
- :mod:`.batch`: the OpenAI Batch API instead (``batch: true``): submit, resume, poll, collect;
- :mod:`.batch_format`: the Batch API's JSONL request and result lines;
- :mod:`.judge`: :class:`~.judge.LLMJudge`, requests from groups, the answer cache, verdicts, dry run;
- :mod:`.metrics`: rubric rates, position bias, cost.

Nothing is imported here, so that ``pipeline.judging.llm.metrics`` loads without the HTTP client.
"""
