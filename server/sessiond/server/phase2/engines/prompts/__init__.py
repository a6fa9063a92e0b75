"""Versioned prompt templates and the memory JSON schema of the LLM Phase 2 engine.

Files are named `<name>.v<version>.md` (and `.schema.json`) and loaded with
`importlib.resources`; see `sessiond.server.phase2.engines.openai.prompts`. A changed prompt is a
new file with the next version, so what produced an archive's summary stays knowable.
"""
