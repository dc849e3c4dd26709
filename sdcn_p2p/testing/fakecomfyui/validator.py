"""Workflow validation as ComfyUI's ``execution.validate_prompt`` does it, for the fake's nodes.

The same checks in the same order, and the same answer shapes: a prompt with no class_type or
an unknown node fails whole (``missing_node_type``), one without an output node too
(``prompt_no_outputs``); each output node's inputs are checked through the nodes it links to
(required inputs, link shapes and return types, conversions, min, max, choice lists, LoadImage
files), and an output that fails is dropped and named in ``node_errors``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sdcn_p2p.testing.fakecomfyui.nodes import NODES

__all__ = ["comfy_error", "validate_prompt"]


def validate_prompt(
    prompt: Any,
    object_info: Callable[[str], dict[str, Any]],
    has_file: Callable[[str], bool],
) -> tuple[bool, dict[str, Any] | None, list[str], dict[str, Any]]:
    """Validate `prompt` (an API-format workflow) against the nodes `object_info` describes,
    with `has_file` telling whether a LoadImage name is an image the fake holds.

    Returns (valid, the error when not, the output nodes to run, ``node_errors``). Converts
    the prompt's literal inputs in place (``"7"`` for an INT is 7), as ComfyUI does.
    """
    return _Validator(prompt, object_info, has_file).run()


class _Validator:
    """One prompt's validation; see `validate_prompt`."""

    def __init__(
        self,
        prompt: Any,
        object_info: Callable[[str], dict[str, Any]],
        has_file: Callable[[str], bool],
    ) -> None:
        self.prompt = prompt
        self.object_info = object_info
        self.has_file = has_file
        self.validated: dict[str, tuple[bool, list[dict[str, Any]]]] = {}

    def run(self) -> tuple[bool, dict[str, Any] | None, list[str], dict[str, Any]]:
        prompt = self.prompt
        if not isinstance(prompt, dict):
            return False, comfy_error("invalid_prompt", "Invalid prompt", "not an object"), [], {}
        outputs = []
        for node_id, node in prompt.items():
            if not isinstance(node, dict) or "class_type" not in node:
                error = comfy_error(
                    "missing_node_type",
                    f"Node 'ID #{node_id}' has no class_type. The workflow may be corrupted or "
                    "a custom node is missing.",
                    f"Node ID '#{node_id}'",
                    node_id=node_id,
                    class_type=None,
                    node_title=None,
                )
                return False, error, [], {}
            spec = NODES.get(node["class_type"])
            if spec is None:
                title = node["class_type"]
                error = comfy_error(
                    "missing_node_type",
                    f"Node '{title}' not found. The custom node may not be installed.",
                    f"Node ID '#{node_id}'",
                    node_id=node_id,
                    class_type=title,
                    node_title=title,
                )
                return False, error, [], {}
            if spec.output_node:
                outputs.append(node_id)
        if not outputs:
            return False, comfy_error("prompt_no_outputs", "Prompt has no outputs", ""), [], {}
        good, errors, node_errors = [], [], {}
        for output in outputs:
            try:
                valid, reasons = self._inputs(output)
            except (KeyError, IndexError, TypeError, AttributeError) as exc:
                valid = False
                reasons = [
                    {
                        "type": "exception_during_validation",
                        "message": "Exception when validating node",
                        "details": str(exc),
                        "extra_info": {"exception_type": type(exc).__name__, "traceback": []},
                    }
                ]
                self.validated[output] = (False, reasons)
            if valid:
                good.append(output)
                continue
            errors.append((output, reasons))
            for node_id, (ok, node_reasons) in self.validated.items():
                if ok or not node_reasons:
                    continue
                entry = node_errors.setdefault(
                    node_id,
                    {
                        "errors": node_reasons,
                        "dependent_outputs": [],
                        "class_type": prompt[node_id]["class_type"],
                    },
                )
                entry["dependent_outputs"].append(output)
        if not good:
            details = "\n".join(f"{e['message']}: {e['details']}" for _, rs in errors for e in rs)
            error = comfy_error(
                "prompt_outputs_failed_validation", "Prompt outputs failed validation", details
            )
            return False, error, [], node_errors
        return True, None, good, node_errors

    def _inputs(self, node_id: str) -> tuple[bool, list[dict[str, Any]]]:
        if node_id in self.validated:
            return self.validated[node_id]
        node = self.prompt[node_id]
        inputs = node.get("inputs")
        if not isinstance(inputs, dict):
            inputs = node["inputs"] = {}
        spec = NODES[node["class_type"]]
        info = self.object_info(node["class_type"])[node["class_type"]]["input"]
        errors: list[dict[str, Any]] = []
        valid = True
        for group in ("required", "optional"):
            for name, (kind, options) in info.get(group, {}).items():
                if name not in inputs:
                    if group == "required":
                        errors.append(
                            _reason(
                                "required_input_missing", "Required input is missing", name, name
                            )
                        )
                    continue
                value = inputs[name]
                config = [kind, options]
                if isinstance(value, list):
                    if len(value) != 2:
                        errors.append(
                            _reason(
                                "bad_linked_input",
                                "Bad linked input, must be a length-2 list of [node_id, slot_index]",  # noqa: E501
                                name,
                                name,
                                input_config=config,
                                received_value=value,
                            )
                        )
                        continue
                    linked = self.prompt[str(value[0])]  # KeyError: exception_during_validation
                    received = NODES[linked["class_type"]].returns[value[1]]
                    if received != kind:
                        errors.append(
                            _reason(
                                "return_type_mismatch",
                                "Return type mismatch between linked nodes",
                                f"{name}, received_type({received}) mismatch input_type({kind})",
                                name,
                                input_config=config,
                                received_type=received,
                                linked_node=value,
                            )
                        )
                        continue
                    if not self._inputs(str(value[0]))[0]:
                        valid = False
                    continue
                converted = _convert(kind, value)
                if converted is None:
                    errors.append(
                        _reason(
                            "invalid_input_type",
                            f"Failed to convert an input value to a {kind} value",
                            f"{name}, {value}, invalid literal",
                            name,
                            input_config=config,
                            received_value=value,
                        )
                    )
                    continue
                inputs[name] = value = converted
                if name in spec.validates:
                    if not self.has_file(str(value)):
                        errors.append(
                            _reason(
                                "custom_validation_failed",
                                "Custom validation failed for node",
                                f"{name} - Invalid image file: {value}",
                                name,
                            )
                        )
                    continue
                if "min" in options and value < options["min"]:
                    errors.append(
                        _reason(
                            "value_smaller_than_min",
                            f"Value {value} smaller than min of {options['min']}",
                            name,
                            name,
                            input_config=config,
                            received_value=value,
                        )
                    )
                elif "max" in options and value > options["max"]:
                    errors.append(
                        _reason(
                            "value_bigger_than_max",
                            f"Value {value} bigger than max of {options['max']}",
                            name,
                            name,
                            input_config=config,
                            received_value=value,
                        )
                    )
                elif isinstance(kind, list) and value not in kind:
                    listed = f"(list of length {len(kind)})" if len(kind) > 20 else str(kind)
                    errors.append(
                        _reason(
                            "value_not_in_list",
                            "Value not in list",
                            f"{name}: {value!r} not in {listed}",
                            name,
                            input_config=None if len(kind) > 20 else config,
                            received_value=value,
                        )
                    )
        result = (valid and not errors, errors)
        self.validated[node_id] = result
        return result


def _convert(kind: Any, value: Any) -> Any:
    try:
        if kind == "INT":
            return int(value)
        if kind == "FLOAT":
            return float(value)
        if kind == "STRING":
            return str(value)
    except (TypeError, ValueError):
        return None
    return value


def comfy_error(kind: str, message: str, details: str, **extra: Any) -> dict[str, Any]:
    """An error as ComfyUI gives it: ``{type, message, details, extra_info}``."""
    return {"type": kind, "message": message, "details": details, "extra_info": extra}


def _reason(kind: str, message: str, details: str, name: str, **extra: Any) -> dict[str, Any]:
    return comfy_error(kind, message, details, input_name=name, **extra)
