"""Rendering results: terminal tables (`tables`), the JSON report (`data`), Markdown (`markdown`);
the mobile report (`mobile`: JSON, Markdown, tables; `html` with `svg` plots).

Algorithms never format output; everything a user reads is built here from the frozen results.
"""

from .data import latency_dict, layer_dict, result_dict, result_json, validation_dict
from .markdown import result_markdown

__all__ = ["latency_dict", "layer_dict", "result_dict", "result_json", "result_markdown", "validation_dict"]
