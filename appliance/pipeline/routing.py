"""Routing: the first rule whose conditions all match a series chooses its pipeline and destinations."""

from __future__ import annotations

import re

from appliance.config import RouteRule


def _text(header, keyword: str) -> str:
    return str(header.get(keyword, "") or "") if header is not None else ""


def matches(rule: RouteRule, calling_ae: str, header, data: str = "images") -> bool:
    """Does ``rule`` apply to a series of ``data`` ("images" or "projections") sent by
    ``calling_ae`` whose first header is ``header``?"""
    if rule.data is not None and rule.data != data:
        return False
    if rule.calling_ae_titles and calling_ae.strip() not in rule.calling_ae_titles:
        return False
    if rule.modalities and _text(header, "Modality") not in rule.modalities:
        return False
    for pattern, keyword in ((rule.series_description, "SeriesDescription"), (rule.protocol_name, "ProtocolName")):
        if pattern is not None and not re.search(pattern, _text(header, keyword), re.IGNORECASE):
            return False
    return True


def route(rules: list[RouteRule], calling_ae: str, header, data: str = "images") -> RouteRule | None:
    return next((r for r in rules if matches(r, calling_ae, header, data)), None)
