"""The vLLM sampling backend (``sample.backend: vllm``, ``evaluate.generation.backend: vllm``).

vLLM is an optional extra: nothing here imports it until an engine is built, and building one
where it is not installed fails at once with the install command. It returns the same
:class:`~pipeline.generation.types.Candidate` records as the transformers backend:

- N candidates per prompt via ``n`` in one request per prompt;
- a seed per request derived from ``(settings.seed, prompt)``, so a prompt gets the same
  candidates whatever batch, chunk or engine it lands in (resume and data parallelism rely on it);
- the summed log-prob of the sampled tokens from vLLM's *raw* log-probs (the model's own
  distribution, before temperature and top-p), as the transformers backend reports;
- text decoded with the pipeline's tokenizer, as the transformers backend does.

Data parallelism: ``data_parallel_size`` engines, each a spawned process that sees only its
``tensor_parallel_size`` GPUs (``CUDA_VISIBLE_DEVICES``) and gets a contiguous shard of each
call's prompts. With one engine, it runs in this process.

Modules: :mod:`.environment` (the process environment: cache folders, the CPU build's settings and
its preloaded libraries), :mod:`.engine` (one ``vllm.LLM`` and its requests), :mod:`.pool`
(data-parallel engine processes), :mod:`.sampler` (the :class:`~pipeline.generation.types.Sampler`).
"""
