"""Serving explanations over HTTP: ``python -m explainer serve`` (docs/SERVING.md).

By concern: ``guard`` (the request body: size, time, content type, JSON, multipart), ``schema`` (the request's
fields), ``decoding`` (image bytes in, masks out), ``api`` (the LitAPI), ``app`` (settings and the LitServer),
``cli`` (the verb).
"""

from explainer.serving.api import ExplanationAPI, batch_stats, build_response, select_classes
from explainer.serving.app import ServeSettings, build_server
from explainer.serving.decoding import decode_image, decode_mask, encode_mask
from explainer.serving.guard import BodyGuard, body_kind, check_json_body, form_to_payload
from explainer.serving.schema import RequestError, parse_request

__all__ = ["BodyGuard", "ExplanationAPI", "RequestError", "ServeSettings", "batch_stats", "body_kind",
           "build_response", "build_server", "check_json_body", "decode_image", "decode_mask", "encode_mask",
           "form_to_payload", "parse_request", "select_classes"]
