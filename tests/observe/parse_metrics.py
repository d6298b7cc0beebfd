"""Parse /metrics with the prometheus_client package's parsers (a reader we did not write).

stdin: the exposition text; argv[1]: "openmetrics" or "prometheus". Prints one JSON object:
{"families": {name: type}, "samples": [[sample name, labels, value, exemplar trace id or null]]}.
Exits non-zero (with the parser's message) when the text does not parse.
"""
import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse
from prometheus_client.parser import text_string_to_metric_families as prom_parse

text = sys.stdin.read()
parse = om_parse if sys.argv[1] == "openmetrics" else prom_parse
families, samples = {}, []
for family in parse(text):
    families[family.name] = family.type
    for s in family.samples:
        exemplar = getattr(s, "exemplar", None)
        samples.append([s.name, s.labels, s.value, exemplar.labels.get("trace_id") if exemplar else None])
print(json.dumps({"families": families, "samples": samples}))
