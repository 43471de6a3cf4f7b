"""Per-user message features: unsubscribe footer, open/click tracking, suppressions,
statistics and the archive copy.

Message transforms (footer, tracking, personalize) work on the spool body (CRLF bytes) and
touch only the text parts they change; stores (suppressions, stats, archive) are plain
objects with blocking methods, called from threads or batched by their reactor-side
wrappers. Nothing here reads the configuration file: service.py passes paths and numbers.
"""
