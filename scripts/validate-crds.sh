#!/usr/bin/env bash
# Validates crds/ as Kubernetes would see it:
#   1. every crds/*.yaml is a valid CustomResourceDefinition of Kubernetes 1.33 (the version
#      k8s-openapi's v1_33 feature targets), checked by kubernetes-validate --strict;
#   2. every crds/examples/*.yaml validates against the openAPIV3Schema of its CRD (jsonschema),
#      with unknown fields rejected as `kubectl apply` (strict field validation) would.
#      The CEL rules (x-kubernetes-validations) need an API server and are not checked here:
#      the Rust tests cover the same rules (operator/api's validate()).
#
#   scripts/validate-crds.sh
#
# The tools live in a Python venv created on first use (needs python3 with the venv module:
# Debian's python3-venv; PyPI reachable) and reused after that:
#   BLOCKGATE_VENV   default $HOME/.cache/blockgate/venv
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=${BLOCKGATE_VENV:-$HOME/.cache/blockgate/venv}
KUBERNETES_VERSION=1.33.0
# Pinned so that a new release of a validator cannot fail a build that changed nothing; the
# stamp file makes a change here recreate the venv.
REQUIREMENTS=(kubernetes-validate==1.37.0 jsonschema==4.26.0 PyYAML==6.0.4)

stamp="$VENV/.blockgate-requirements"
if [ ! -x "$VENV/bin/kubernetes-validate" ] || [ "$(cat "$stamp" 2>/dev/null)" != "${REQUIREMENTS[*]}" ]; then
    echo "creating the validation venv in $VENV"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${REQUIREMENTS[@]}"
    echo "${REQUIREMENTS[*]}" >"$stamp"
fi

shopt -s nullglob
crds=(crds/*.yaml)
examples=(crds/examples/*.yaml)
[ ${#crds[@]} -gt 0 ] || {
    echo "validate-crds.sh: no crds/*.yaml" >&2
    exit 1
}

echo "+ kubernetes-validate -k $KUBERNETES_VERSION --strict ${crds[*]}"
status=0
"$VENV/bin/kubernetes-validate" -k "$KUBERNETES_VERSION" --strict "${crds[@]}" || status=1

echo "+ examples against their CRD's openAPIV3Schema: ${examples[*]}"
"$VENV/bin/python" - "${crds[@]}" -- "${examples[@]}" <<'PYTHON' || status=1
import copy
import sys

import jsonschema
import yaml

args = sys.argv[1:]
split = args.index("--")
crd_files, example_files = args[:split], args[split + 1:]


def strict(schema, at_root=False):
    """The structural schema as jsonschema reads it: `nullable` as a null type, and objects
    with listed properties closed (Kubernetes prunes unknown fields; strict field validation,
    kubectl's default, refuses them)."""
    schema = copy.deepcopy(schema)

    def walk(node, root):
        if not isinstance(node, dict):
            return
        if node.pop("nullable", False) and "type" in node:
            node["type"] = [node["type"], "null"]
        node.pop("x-kubernetes-validations", None)
        properties = node.get("properties")
        if (
            properties is not None
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for child in (properties or {}).values():
            walk(child, False)
        if root and isinstance(properties, dict):
            # The API server's own fields: ObjectMeta is not the CRD's to describe.
            properties["apiVersion"] = {"type": "string"}
            properties["kind"] = {"type": "string"}
            properties["metadata"] = {"type": "object"}
        for key in ("items", "additionalProperties"):
            walk(node.get(key), False)
        for key in ("allOf", "anyOf", "oneOf"):
            for child in node.get(key, []):
                walk(child, False)
        if "not" in node:
            walk(node["not"], False)

    walk(schema, at_root)
    return schema


schemas = {}
for path in crd_files:
    with open(path) as f:
        for crd in yaml.safe_load_all(f):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            spec = crd["spec"]
            for version in spec["versions"]:
                key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
                schemas[key] = (path, strict(version["schema"]["openAPIV3Schema"], True))

failed = 0
checked = 0
for path in example_files:
    with open(path) as f:
        documents = [d for d in yaml.safe_load_all(f) if d]
    for document in documents:
        key = (document.get("apiVersion"), document.get("kind"))
        name = document.get("metadata", {}).get("name", "?")
        if key not in schemas:
            print(f"FAIL {path}: {key[1]} {name}: no CRD in crds/ defines {key[0]} {key[1]}")
            failed += 1
            continue
        crd_path, schema = schemas[key]
        validator = jsonschema.Draft7Validator(schema)
        errors = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
        for error in errors:
            where = ".".join(str(p) for p in error.absolute_path) or "(root)"
            print(f"FAIL {path}: {key[1]} {name}: {where}: {error.message}")
        if errors:
            failed += 1
        else:
            checked += 1
            print(f"INFO {path}: {key[1]} {name} passed against {crd_path}")

if failed:
    print(f"{failed} example document(s) do not validate")
    sys.exit(1)
print(f"{checked} example document(s) valid")
PYTHON
exit $status
