#!/usr/bin/env bash
# Checks the cloud manager's templates before anyone deploys them:
#  - cfn-lint on deploy/aws/cloudformation.yaml;
#  - the template's IAM statements equal deploy/aws/iam-policy.json's, and the ARM role's
#    actions equal deploy/azure/role.json's, so the three never drift apart;
#  - deploy/azure/ferry-cloud.json against a deploymentTemplate schema written here (no
#    registry reachable from CI ships Azure's), its [expressions] parsed and resolved;
#  - the boot scripts of both templates pass `bash -n`, and the cloud.toml each writes
#    has only keys ferry-cloud accepts (ServeFile rejects unknown ones) and the unit's
#    data dir;
#  - the boot scripts download ferry-tunnel's and ferry-cloud's .deb from their URL
#    parameters and install both in one apt call (no apt repository has ferry-tunnel);
#  - the READMEs' deploy commands pass every required parameter, and name the operator
#    credentials where ferry-cloud writes them.
# Usage: deploy/check-templates.sh [CLOUDFORMATION_YAML [ARM_JSON]] (default: the real ones).
set -euo pipefail
deploy=$(cd "$(dirname "$0")" && pwd)
cfn=${1:-$deploy/aws/cloudformation.yaml}
arm=${2:-$deploy/azure/ferry-cloud.json}

# cfn-lint, jsonschema and PyYAML (PyPI) in their own venv, kept between runs like the
# other test tools; made again when a pin changes.
CFN_LINT_VERSION=1.58.0
pins="cfn-lint==$CFN_LINT_VERSION jsonschema==4.26.0 PyYAML==6.0.4"
VENV=/var/cache/ferry-tests/cfnlint
have=$("$VENV/bin/python" -c 'import importlib.metadata as m
print(" ".join(f"{p}=={m.version(p)}" for p in ("cfn-lint", "jsonschema", "PyYAML")))' 2>/dev/null || true)
if [ "$have" != "$pins" ]; then
  python3 -m venv --clear "$VENV"
  # shellcheck disable=SC2086 # one word per pin
  "$VENV/bin/pip" install -q $pins
fi

status=0
echo "== cfn-lint $CFN_LINT_VERSION: $cfn"
# Informational findings fail too: the template is small enough to keep at zero.
if "$VENV/bin/cfn-lint" --include-checks I --non-zero-exit-code informational -- "$cfn"; then
  echo "ok: cfn-lint found nothing"
else
  echo "FAIL: cfn-lint (above)"
  status=1
fi

"$VENV/bin/python" - "$cfn" "$arm" "$deploy" <<'PY' || status=1
import json, re, shlex, subprocess, sys, tomllib
from pathlib import Path

import jsonschema
import yaml

cfn_path, arm_path, deploy = sys.argv[1], sys.argv[2], Path(sys.argv[3])
problems = []


def fail(msg):
    problems.append(msg)
    print(f"FAIL: {msg}")


def ok(msg):
    print(f"ok: {msg}")


# ---- ferry-cloud's config keys, read from the struct that parses them ----------------

def struct_fields(path, name):
    text = path.read_text()
    m = re.search(r"pub struct %s \{(.*?)\n\}" % name, text, re.S)
    if not m:
        raise SystemExit(f"{path}: struct {name} not found")
    return set(re.findall(r"^\s*pub (\w+):", m.group(1), re.M))


root = deploy.parent
SERVE_KEYS = struct_fields(root / "cloud-manager/src/config.rs", "ServeFile")
AZURE_KEYS = struct_fields(root / "cloud-manager/provider/src/lib.rs", "AzureConfig")

# The unit's --data-dir overrides the TOML's; operators copy the TOML's into
# `ferry-cloud token create --data-dir`, so the two must agree.
DATA_DIR = "/var/lib/ferry/cloud"
unit = (deploy / "systemd/ferry-cloud.service").read_text()
m = re.search(r"^ExecStart=.*--data-dir[ =](\S+)", unit, re.M)
if not m or m.group(1) != DATA_DIR:
    fail(f"systemd/ferry-cloud.service: ExecStart --data-dir is {m and m.group(1)!r}, the templates use {DATA_DIR}")

# ferry-cloud depends on ferry-tunnel: each .deb, with the sample URL of its parameter.
DEBS = {"/tmp/ferry-tunnel.deb": "https://example.invalid/ferry-tunnel.deb",
        "/tmp/ferry-cloud.deb": "https://example.invalid/ferry-cloud.deb"}


def check_toml(where, text, provider):
    try:
        conf = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        return fail(f"{where}: cloud.toml does not parse: {e}")
    extra = set(conf) - SERVE_KEYS
    if extra:
        fail(f"{where}: cloud.toml keys ferry-cloud rejects: {sorted(extra)}")
    extra = set(conf.get("azure", {})) - AZURE_KEYS
    if extra:
        fail(f"{where}: cloud.toml [azure] keys ferry-cloud rejects: {sorted(extra)}")
    if conf.get("data_dir") != DATA_DIR:
        fail(f"{where}: cloud.toml data_dir is {conf.get('data_dir')!r}, must be {DATA_DIR!r} (the unit's --data-dir)")
    if conf.get("provider") != provider:
        fail(f"{where}: cloud.toml must set provider {provider}")
    if not str(conf.get("listen", "")).startswith("0.0.0.0:"):
        fail(f"{where}: cloud.toml must listen on 0.0.0.0:PORT")
    if provider == "azure" and set(conf.get("azure", {})) < {"subscription_id", "resource_group", "location"}:
        fail(f"{where}: cloud.toml [azure] lacks subscription_id, resource_group or location")


def check_bash(where, script):
    r = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    if r.returncode:
        fail(f"{where}: bash -n: {r.stderr.strip()}")


def check_install(where, script):
    """Each .deb is fetched from its parameter's URL, then one apt call installs them
    all: apt cannot resolve ferry-cloud's dependency on ferry-tunnel otherwise."""
    cmds = []
    for line in script.replace("\\\n", " ").splitlines():
        if "curl" in line or "apt-get" in line:
            try:
                cmds.append(shlex.split(line, comments=True))
            except ValueError:
                pass
    fetched = {}
    for j, words in enumerate(cmds):
        if words[:1] == ["curl"] and "-o" in words[:-1]:
            fetched[words[words.index("-o") + 1]] = (j, [w for w in words if "://" in w])
    for deb, url in DEBS.items():
        if deb not in fetched:
            fail(f"{where}: never downloads {deb}")
        elif fetched[deb][1] != [url]:
            fail(f"{where}: downloads {deb} from {fetched[deb][1]}, want its parameter's {url}")
    installs = [(j, [w for w in words if w.endswith(".deb")]) for j, words in enumerate(cmds)
                if words[:2] == ["apt-get", "install"] and any(w.endswith(".deb") for w in words)]
    if len(installs) != 1 or sorted(installs[0][1]) != sorted(DEBS):
        return fail(f"{where}: want one apt-get install of {' '.join(DEBS)}, "
                    f"found {[debs for _, debs in installs]}")
    if any(j > installs[0][0] for j, _ in fetched.values()):
        fail(f"{where}: apt-get install runs before every .deb is downloaded")


def check_readme(where, path, required):
    """The deploy command passes every parameter without a default, and the operator
    credentials are where ferry-cloud writes them (DATA_DIR/operator.toml)."""
    text = path.read_text()
    for name in sorted(required):
        if not re.search(r"(?<![\w-])%s=" % re.escape(name), text):
            fail(f"{where}: {path.name}'s deploy command lacks the required {name}=")
    want = f"{DATA_DIR}/operator.toml"
    paths = set(re.findall(r"(?:/[\w.-]+)*/?operator\.toml", text))
    if paths != {want}:
        fail(f"{where}: {path.name} must give the operator credentials as {want}, names {sorted(paths)}")


# ---- AWS ------------------------------------------------------------------------------

class CfnLoader(yaml.SafeLoader):
    pass


def _intrinsic(loader, suffix, node):
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    if suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {"Ref" if suffix == "Ref" else "Fn::" + suffix: value}


CfnLoader.add_multi_constructor("!", _intrinsic)


def canon(value):
    """Order-free form: IAM gives lists of actions and statements no order."""
    if isinstance(value, dict):
        return {k: canon(v) for k, v in value.items()}
    if isinstance(value, list):
        items = [canon(v) for v in value]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    return value


def check_aws():
    tpl = yaml.load(Path(cfn_path).read_text(), Loader=CfnLoader)
    want = json.loads((deploy / "aws/iam-policy.json").read_text())
    res = tpl.get("Resources", {})
    by_type = lambda t: {k: v for k, v in res.items() if v.get("Type") == t}
    roles = by_type("AWS::IAM::Role")
    others = [k for k, v in res.items() if v.get("Type") in
              ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy", "AWS::IAM::RolePolicy")]
    if len(roles) != 1 or others:
        return fail(f"aws: want one IAM role and no separate policies, found roles {sorted(roles)}, policies {others}")
    name, role = next(iter(roles.items()))
    props = role.get("Properties", {})
    if props.get("ManagedPolicyArns"):
        fail(f"aws: role {name} has ManagedPolicyArns: it must hold iam-policy.json only")
    policies = props.get("Policies", [])
    if len(policies) != 1:
        return fail(f"aws: role {name} must have exactly one inline policy, has {len(policies)}")
    doc = policies[0].get("PolicyDocument", {})
    if doc.get("Version") != want["Version"]:
        fail(f"aws: policy Version {doc.get('Version')!r}, iam-policy.json has {want['Version']!r}")
    got = {s.get("Sid"): s for s in doc.get("Statement", [])}
    exp = {s["Sid"]: s for s in want["Statement"]}
    before = len(problems)
    for sid in sorted(exp.keys() - got.keys()):
        fail(f"aws: statement {sid} of iam-policy.json is missing from the template")
    for sid in sorted(got.keys() - exp.keys(), key=str):
        fail(f"aws: statement {sid} is in the template but not in iam-policy.json")
    for sid in sorted(exp.keys() & got.keys()):
        g, e = got[sid], exp[sid]
        for key in sorted(g.keys() | e.keys()):
            if canon(g.get(key)) == canon(e.get(key)):
                continue
            if key == "Action":
                ga, ea = set(g.get(key) or []), set(e.get(key) or [])
                fail(f"aws: {sid} Action: missing {sorted(ea - ga)}, extra {sorted(ga - ea)}")
            else:
                fail(f"aws: {sid} {key}: template {g.get(key)!r}, iam-policy.json {e.get(key)!r}")
    if len(problems) == before:
        ok(f"aws: role {name} holds exactly the {len(exp)} statements of iam-policy.json")

    params = tpl.get("Parameters", {})
    before = len(problems)
    if "Default" in params.get("AllowFrom", {}):
        fail("aws: AllowFrom must have no default")
    # Each URL lands in '…' in the boot script: the pattern must keep quotes out.
    for url_param, deb in (("TunnelPackageUrl", "/tmp/ferry-tunnel.deb"), ("PackageUrl", "/tmp/ferry-cloud.deb")):
        pattern = params.get(url_param, {}).get("AllowedPattern")
        if url_param not in params or "Default" in params[url_param] or not pattern:
            fail(f"aws: {url_param} must be a parameter with an AllowedPattern and no default")
            continue
        bad = [v for v in ("https://e.invalid/a'b.deb", 'https://e.invalid/a"b.deb',
                           "https://e.invalid/a b.deb", "file:///a.deb", "")
               if re.fullmatch(pattern, v)]
        if not re.fullmatch(pattern, DEBS[deb]) or bad:
            fail(f"aws: {url_param} AllowedPattern {pattern!r} must take {DEBS[deb]} and refuse {bad}")
    check_readme("aws", deploy / "aws/README.md",
                 {k for k, v in params.items() if "Default" not in v})
    for sg_name, sg in by_type("AWS::EC2::SecurityGroup").items():
        for rule in sg.get("Properties", {}).get("SecurityGroupIngress", []):
            if (rule.get("CidrIp") != {"Ref": "AllowFrom"} or "CidrIpv6" in rule
                    or rule.get("FromPort") != {"Ref": "ListenPort"}
                    or rule.get("ToPort") != {"Ref": "ListenPort"}):
                fail(f"aws: {sg_name} opens more than ListenPort from AllowFrom: {rule}")
    for v_name, v in by_type("AWS::EC2::Volume").items():
        if v.get("Properties", {}).get("Encrypted") is not True:
            fail(f"aws: volume {v_name} is not encrypted")

    # The boot script, with each ${Param} given a sample value (${!x} is a literal ${x}).
    samples = {"DataVolumeSize": "200", "ListenPort": "7443",
               "TunnelPackageUrl": DEBS["/tmp/ferry-tunnel.deb"],
               "PackageUrl": DEBS["/tmp/ferry-cloud.deb"]}
    for inst_name, inst in by_type("AWS::EC2::Instance").items():
        user_data = inst.get("Properties", {}).get("UserData", {}).get("Fn::Base64", {})
        sub = user_data.get("Fn::Sub") if isinstance(user_data, dict) else None
        if not isinstance(sub, str):
            fail(f"aws: {inst_name} UserData is not Fn::Base64 of an Fn::Sub string")
            continue
        for var in set(re.findall(r"\$\{(?!!)([^}]+)\}", sub)):
            if var not in params and not var.startswith("AWS::") and var.split(".")[0] not in res:
                fail(f"aws: UserData names ${{{var}}}, neither a parameter nor a resource")
        script = re.sub(r"\$\{!", "${", re.sub(r"\$\{(?!!)([^}]+)\}",
                        lambda m: samples.get(m.group(1), "x"), sub))
        check_bash(f"aws: {inst_name} UserData", script)
        check_install(f"aws: {inst_name} UserData", script)
        heredoc = re.search(r"cat > /etc/ferry/cloud\.toml <<EOF\n(.*?)\nEOF\n", script, re.S)
        if not heredoc:
            fail(f"aws: {inst_name} UserData writes no /etc/ferry/cloud.toml")
        else:
            check_toml(f"aws: {inst_name}", heredoc.group(1).replace("$ip", "10.0.0.5"), "aws")
    if len(problems) == before:
        ok(f"aws: the listener is open to AllowFrom only, UserData passes bash -n, its cloud.toml has only known keys and data_dir {DATA_DIR}")
        ok("aws: UserData downloads both .debs from PackageUrl/TunnelPackageUrl (quote-free patterns) and installs them in one apt call")
        ok(f"aws: README.md passes every required parameter and names {DATA_DIR}/operator.toml")


# ---- Azure: the deploymentTemplate schema (top level and resource envelope) ------------

ARM_TYPES = {"type": "string", "pattern": "(?i)^(string|securestring|int|bool|object|secureobject|array)$"}
ARM_SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "required": ["$schema", "contentVersion", "resources"],
    "additionalProperties": False,
    "properties": {
        "$schema": {"const": "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#"},
        "contentVersion": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+){3}$"},
        "apiProfile": {"type": "string"},
        "metadata": {"type": "object"},
        "functions": {"type": "array"},
        "parameters": {
            "type": "object",
            "propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
            "additionalProperties": {
                "type": "object",
                "required": ["type"],
                "additionalProperties": False,
                "properties": {
                    "type": ARM_TYPES,
                    "defaultValue": {},
                    "allowedValues": {"type": "array", "minItems": 1},
                    "minValue": {"type": "integer"},
                    "maxValue": {"type": "integer"},
                    "minLength": {"type": "integer", "minimum": 0},
                    "maxLength": {"type": "integer", "minimum": 0},
                    "metadata": {"type": "object"},
                },
            },
        },
        "variables": {"type": "object", "propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_]*$"}},
        "resources": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["type", "apiVersion", "name"],
                "additionalProperties": False,
                "properties": {
                    "type": {"type": "string", "pattern": r"^[A-Za-z0-9]+(\.[A-Za-z0-9]+)+(/[A-Za-z0-9]+)+$"},
                    "apiVersion": {"type": "string", "pattern": r"^[0-9]{4}-[0-9]{2}-[0-9]{2}(-(preview|beta|alpha|privatepreview))?$"},
                    "name": {"type": "string", "minLength": 1},
                    "location": {"type": "string"},
                    "tags": {"type": "object", "additionalProperties": {"type": "string"}},
                    "dependsOn": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
                    "properties": {"type": "object"},
                    "identity": {
                        "type": "object",
                        "required": ["type"],
                        "properties": {"type": {"enum": ["SystemAssigned", "UserAssigned", "SystemAssigned, UserAssigned", "None"]}},
                    },
                    "sku": {"type": "object"},
                    "kind": {"type": "string"},
                    "zones": {"type": ["array", "string"]},
                    "plan": {"type": "object"},
                    "comments": {"type": "string"},
                    "condition": {"type": ["boolean", "string"]},
                    "copy": {"type": "object"},
                    "scope": {"type": "string"},
                    "extendedLocation": {"type": "object"},
                    "managedBy": {"type": "string"},
                },
            },
        },
        "outputs": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "required": ["type", "value"],
                "additionalProperties": False,
                "properties": {"type": ARM_TYPES, "value": {}, "condition": {}, "metadata": {"type": "object"}},
            },
        },
    },
}

# ---- Azure: template expressions -------------------------------------------------------

# Every ARM template function (name: (least, most) arguments; None: no bound).
ARM_FUNCTIONS = {
    "add": (2, 2), "and": (2, None), "array": (1, 1), "base64": (1, 1), "base64tojson": (1, 1),
    "base64tostring": (1, 1), "bool": (1, 1), "coalesce": (1, None), "concat": (1, None),
    "contains": (2, 2), "copyindex": (0, 2), "createarray": (0, None), "createobject": (0, None),
    "datauri": (1, 1), "datauritostring": (1, 1), "datetimeadd": (2, 3),
    "datetimefromepoch": (1, 1), "datetimetoepoch": (1, 1), "deployment": (0, 0), "div": (2, 2),
    "empty": (1, 1), "endswith": (2, 2), "environment": (0, 0), "equals": (2, 2),
    "extensionresourceid": (3, None), "false": (0, 0), "filter": (2, 2), "first": (1, 1),
    "flatten": (1, 1), "float": (1, 1), "format": (1, None), "greater": (2, 2),
    "greaterorequals": (2, 2), "guid": (1, None), "if": (3, 3), "indexof": (2, 2), "int": (1, 1),
    "intersection": (2, None), "items": (1, 1), "join": (2, 2), "json": (1, 1), "lambda": (2, None),
    "lambdavariables": (1, 1), "last": (1, 1), "lastindexof": (2, 2), "length": (1, 1),
    "less": (2, 2), "lessorequals": (2, 2), "list": (2, 3), "managementgroup": (0, 1),
    "managementgroupresourceid": (2, None), "map": (2, 2), "max": (1, None), "min": (1, None),
    "mod": (2, 2), "mul": (2, 2), "newguid": (0, 0), "not": (1, 1), "null": (0, 0),
    "objectkeys": (1, 1), "or": (2, None), "padleft": (2, 3), "parameters": (1, 1),
    "pickzones": (3, 5), "providers": (1, 2), "range": (2, 2), "reduce": (3, 3),
    "reference": (1, 3), "references": (1, 2), "replace": (3, 3), "resourcegroup": (0, 0),
    "resourceid": (2, None), "shallowmerge": (1, 1), "skip": (2, 2), "sort": (2, 2),
    "split": (2, 2), "startswith": (2, 2), "string": (1, 1), "sub": (2, 2),
    "subscription": (0, 0), "subscriptionresourceid": (2, None), "substring": (1, 3),
    "take": (2, 2), "tenant": (0, 0), "tenantresourceid": (2, None), "tolower": (1, 1),
    "toobject": (2, 3), "toupper": (1, 1), "trim": (1, 1), "true": (0, 0), "tryget": (2, None),
    "union": (1, None), "uniquestring": (1, None), "uri": (2, 2), "uricomponent": (1, 1),
    "uricomponenttostring": (1, 1), "utcnow": (0, 1), "variables": (1, 1),
}
ID_FUNCTIONS = {"resourceid", "subscriptionresourceid"}
TOKEN = re.compile(r"\s*(?:(?P<str>'(?:[^']|'')*')|(?P<num>-?[0-9]+)|(?P<ident>[A-Za-z_][A-Za-z0-9_]*)|(?P<punct>[().,\[\]]))")


class ExprError(Exception):
    pass


def tokenize(text):
    pos, out = 0, []
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = TOKEN.match(text, pos)
        if not m:
            rest = text[pos:].lstrip()
            raise ExprError("unterminated string" if rest.startswith("'") else f"unexpected {rest[:12]!r}")
        kind = m.lastgroup
        val = m.group(kind)
        out.append((kind, val[1:-1].replace("''", "'") if kind == "str" else val))
        pos = m.end()
    return out


def parse(text):
    """ARM expression -> tree: ('call', name, args) ('str', s) ('num', n)
    ('member', base, name) ('index', base, expr)."""
    toks, i = tokenize(text), 0

    def peek():
        return toks[i] if i < len(toks) else (None, None)

    def take(kind, val=None):
        nonlocal i
        k, v = peek()
        if k != kind or (val is not None and v != val):
            raise ExprError(f"expected {val or kind}, found {v!r}" if v else f"expected {val or kind} at the end")
        i += 1
        return v

    def expr():
        nonlocal i
        k, v = peek()
        if k == "str":
            i += 1
            node = ("str", v)
        elif k == "num":
            i += 1
            node = ("num", int(v))
        elif k == "ident":
            i += 1
            take("punct", "(")
            args = []
            if peek() != ("punct", ")"):
                args.append(expr())
                while peek() == ("punct", ","):
                    i += 1
                    args.append(expr())
            take("punct", ")")
            node = ("call", v, args)
        else:
            raise ExprError(f"expected a value, found {v!r}" if v else "empty expression")
        while True:
            if peek() == ("punct", "."):
                i += 1
                node = ("member", node, take("ident"))
            elif peek() == ("punct", "["):
                i += 1
                node = ("index", node, expr())
                take("punct", "]")
            else:
                return node

    tree = expr()
    if i != len(toks):
        raise ExprError(f"unexpected {toks[i][1]!r} after the expression")
    if tree[0] not in ("call", "member", "index"):
        raise ExprError("an expression must call a function")
    return tree


def unparse(n):
    kind = n[0]
    if kind == "str":
        return "'" + n[1].replace("'", "''") + "'"
    if kind == "num":
        return str(n[1])
    if kind == "call":
        return f"{n[1]}({', '.join(unparse(a) for a in n[2])})"
    if kind == "member":
        return f"{unparse(n[1])}.{n[2]}"
    return f"{unparse(n[1])}[{unparse(n[2])}]"


def calls(n):
    if n[0] == "call":
        yield n
        for a in n[2]:
            yield from calls(a)
    elif n[0] in ("member", "index"):
        yield from calls(n[1])
        if n[0] == "index":
            yield from calls(n[2])


def strings(node, path):
    """Every string value in the template with its JSON path."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from strings(v, f"{path}.{k}")
    elif isinstance(node, list):
        for j, v in enumerate(node):
            yield from strings(v, f"{path}[{j}]")
    elif isinstance(node, str):
        yield path, node


def check_azure():
    tpl = json.loads(Path(arm_path).read_text())
    role = json.loads((deploy / "azure/role.json").read_text())
    errors = sorted(jsonschema.Draft7Validator(ARM_SCHEMA).iter_errors(tpl), key=lambda e: list(e.path))
    for e in errors:
        fail(f"azure: schema: {'/'.join(map(str, e.path)) or '(top)'}: {e.message}")
    if errors:
        return print("   (the other azure checks wait for a template of the right shape)")
    ok("azure: deploymentTemplate structure (schema written here, see the header)")

    params = {k.lower(): k for k in tpl.get("parameters", {})}
    variables = {k.lower(): k for k in tpl.get("variables", {})}
    used_params, used_vars = set(), set()
    trees = {}  # JSON path -> parsed expression
    before = len(problems)
    for path, s in strings(tpl, "$"):
        if s.startswith("[["):
            continue  # an escaped literal "[..."
        if not s.startswith("["):
            if re.search(r"\b(parameters|variables|resourceId|reference|format)\('", s):
                fail(f"azure: {path}: looks like an expression but is a literal (no [ ]): {s[:60]!r}")
            continue
        if not s.endswith("]"):
            fail(f"azure: {path}: starts with '[' but does not end with ']': {s[:60]!r}")
            continue
        try:
            tree = parse(s[1:-1])
        except ExprError as e:
            fail(f"azure: {path}: {e}: {s[:80]!r}")
            continue
        trees[path] = tree
        for _, name, args in calls(tree):
            low = name.lower()
            if low not in ARM_FUNCTIONS and not low.startswith("list"):
                fail(f"azure: {path}: unknown function {name}()")
                continue
            least, most = ARM_FUNCTIONS.get(low, (0, None))
            if len(args) < least or (most is not None and len(args) > most):
                fail(f"azure: {path}: {name}() takes {least}..{most if most is not None else 'n'} arguments, has {len(args)}")
            if low in ("parameters", "variables") and args:
                if args[0][0] != "str":
                    fail(f"azure: {path}: {name}() with a computed name cannot be checked")
                    continue
                declared, used = (params, used_params) if low == "parameters" else (variables, used_vars)
                if args[0][1].lower() not in declared:
                    fail(f"azure: {path}: {name}('{args[0][1]}') is not declared")
                used.add(args[0][1].lower())
            if (low == "reference" or low.startswith("list")) and path.startswith("$.variables"):
                fail(f"azure: {path}: {name}() is not allowed in variables")
            if low in ID_FUNCTIONS and args and args[0][0] == "str":
                segments = args[0][1].split("/")
                if len(segments) < 2 or len(args) - 1 != len(segments) - 1:
                    fail(f"azure: {path}: {name}('{args[0][1]}') needs {len(segments) - 1} name argument(s), has {len(args) - 1}")
    for low, name in params.items():
        if low not in used_params:
            fail(f"azure: parameter {name} is declared but never used")
    for low, name in variables.items():
        if low not in used_vars:
            fail(f"azure: variable {name} is declared but never used")

    # format(): every {n} has an argument and every argument a {n}, when the format
    # string is known before deployment (a literal, a variable, or a join of them).
    def static(n):
        if n[0] == "str":
            return n[1]
        if n[0] == "call" and n[1].lower() == "variables" and n[2] and n[2][0][0] == "str":
            v = tpl.get("variables", {}).get(variables.get(n[2][0][1].lower(), ""))
            if isinstance(v, str) and not v.startswith("["):
                return v
            if isinstance(v, list) and all(isinstance(x, str) and not x.startswith("[") for x in v):
                return v
        if n[0] == "call" and n[1].lower() == "join" and len(n[2]) == 2:
            items, sep = static(n[2][0]), static(n[2][1])
            if isinstance(items, list) and isinstance(sep, str):
                return sep.join(items)
        return None

    for path, tree in trees.items():
        for _, name, args in calls(tree):
            if name.lower() != "format" or not args:
                continue
            text = static(args[0])
            if not isinstance(text, str):
                continue
            stripped = text.replace("{{", "").replace("}}", "")
            hole = r"\{(\d+)(?:[,:][^}]*)?\}"
            holes = re.findall(hole, stripped)
            if set("{}") & set(re.sub(hole, "", stripped)):
                fail(f"azure: {path}: format() string has a lone brace (write {{{{ or }}}})")
            used = {int(h) for h in holes}
            if used != set(range(len(args) - 1)):
                fail(f"azure: {path}: format() fills {{0}}..{{{len(args) - 2}}} but the string uses {sorted(used)}")
    if len(problems) == before:
        ok(f"azure: {len(trees)} expressions parse, call known functions, name declared parameters and variables")

    # dependsOn and references between the template's resources.
    resources = tpl["resources"]

    def name_key(res):
        n = res["name"]
        if n.startswith("[") and not n.startswith("[["):
            try:
                return (unparse(parse(n[1:-1])),)
            except ExprError:
                return None
        return tuple(unparse(("str", part)) for part in n.split("/"))

    index = {(r["type"].lower(), name_key(r)): j for j, r in enumerate(resources)}
    by_name = {}
    for j, r in enumerate(resources):
        if not r["name"].startswith("["):
            by_name.setdefault(r["name"], []).append(j)
    if len(index) != len(resources):
        fail("azure: two resources share a type and a name")

    def target(call):
        """The template resource a resourceId()/reference() call names, or None."""
        _, name, args = call
        low = name.lower()
        if low in ID_FUNCTIONS and args and args[0][0] == "str":
            return index.get((args[0][1].lower(), tuple(unparse(a) for a in args[1:])))
        if low == "reference" and args:
            inner = args[0]
            if inner[0] == "call" and inner[1].lower() in ID_FUNCTIONS:
                return target(inner)
            if inner[0] == "str" and len(by_name.get(inner[1], [])) == 1:
                return by_name[inner[1]][0]
        return None

    deps = {}
    before = len(problems)
    for j, r in enumerate(resources):
        deps[j] = set()
        for k, d in enumerate(r.get("dependsOn", [])):
            path = f"$.resources[{j}].dependsOn[{k}]"
            if d.startswith("["):
                tree = trees.get(path)
                t = target(tree) if tree and tree[0] == "call" else None
            else:
                t = by_name.get(d, [None])[0] if len(by_name.get(d, [])) == 1 else None
            if t is None:
                fail(f"azure: {path}: {d!r} names no resource of this template")
            elif t == j:
                fail(f"azure: {path}: resource depends on itself")
            else:
                deps[j].add(t)

    def closure(j, seen=None):
        seen = set() if seen is None else seen
        for t in deps[j]:
            if t not in seen:
                seen.add(t)
                closure(t, seen)
        return seen

    for j in deps:
        if j in closure(j):
            fail(f"azure: resources[{j}] ({resources[j]['type']}) is in a dependsOn cycle")
    # A resource that uses another one's id or state must be deployed after it.
    reported = set()
    for path, tree in trees.items():
        m = re.match(r"^\$\.resources\[(\d+)\]\.(.*)$", path)
        if not m or m.group(2).startswith(("dependsOn", "name")):
            continue
        j = int(m.group(1))
        for call in calls(tree):
            t = target(call)
            if t is not None and t != j and t not in closure(j) and (path, t) not in reported:
                reported.add((path, t))
                fail(f"azure: {path}: uses {resources[t]['type']} {resources[t]['name']} without depending on it")
    if len(problems) == before:
        ok(f"azure: every dependsOn names a resource here, no cycles, every use of another resource is ordered after it")

    # The custom role: exactly role.json's actions, assignable in this group only.
    roledefs = [(j, r) for j, r in enumerate(resources) if r["type"].lower() == "microsoft.authorization/roledefinitions"]
    if len(roledefs) != 1:
        return fail(f"azure: want one role definition, found {len(roledefs)}")
    rd_index, rd = roledefs[0]
    props = rd.get("properties", {})
    perms = props.get("permissions", [])
    if len(perms) != 1:
        return fail(f"azure: the role must have one permissions block, has {len(perms)}")
    actions = perms[0].get("actions", [])
    before = len(problems)
    if len(set(actions)) != len(actions):
        fail("azure: the role lists an action twice")
    missing, extra = sorted(set(role["Actions"]) - set(actions)), sorted(set(actions) - set(role["Actions"]))
    if missing or extra:
        fail(f"azure: role actions differ from role.json: missing {missing}, extra {extra}")
    if perms[0].get("notActions", []) != role.get("NotActions", []):
        fail(f"azure: role notActions {perms[0].get('notActions')} differ from role.json's {role.get('NotActions')}")
    if perms[0].get("dataActions") or perms[0].get("notDataActions"):
        fail("azure: the role has data actions that role.json does not")
    if props.get("assignableScopes") != ["[resourceGroup().id]"]:
        fail(f"azure: the role must be assignable in the resource group only, not {props.get('assignableScopes')}")
    assigned = False
    for j, r in enumerate(resources):
        if r["type"].lower() != "microsoft.authorization/roleassignments":
            continue
        tree = trees.get(f"$.resources[{j}].properties.roleDefinitionId")
        if tree and tree[0] == "call" and target(tree) == rd_index:
            pid = r.get("properties", {}).get("principalId", "")
            if "identity.principalId" in pid and "Microsoft.Compute/virtualMachines" in pid:
                assigned = True
    if not assigned:
        fail("azure: no role assignment gives the role to the VM's identity")
    if len(problems) == before:
        ok(f"azure: the role holds exactly the {len(actions)} actions of role.json and is assigned to the VM")

    # The listener, and only it, from allowFrom; SSH keys only.
    if "defaultValue" in tpl["parameters"].get("allowFrom", {}):
        fail("azure: allowFrom must have no default")
    # ARM has no patterns: the description at least tells what the boot script accepts.
    before = len(problems)
    for url_param in ("tunnelPackageUrl", "packageUrl"):
        p = tpl["parameters"].get(url_param, {})
        if p.get("type") != "string" or "defaultValue" in p or not p.get("metadata", {}).get("description"):
            fail(f"azure: {url_param} must be a string parameter with a description and no default")
    check_readme("azure", deploy / "azure/README.md",
                 {k for k, v in tpl["parameters"].items() if "defaultValue" not in v})
    if len(problems) == before:
        ok(f"azure: packageUrl/tunnelPackageUrl are described; README.md passes every required parameter and names {DATA_DIR}/operator.toml")
    for j, r in enumerate(resources):
        if r["type"].lower() == "microsoft.network/networksecuritygroups":
            for rule in r.get("properties", {}).get("securityRules", []):
                p = rule.get("properties", {})
                if p.get("direction") == "Inbound" and p.get("access") == "Allow" and (
                        p.get("sourceAddressPrefix") != "[parameters('allowFrom')]"
                        or p.get("destinationPortRange") != "[string(parameters('listenPort'))]"
                        or "sourceAddressPrefixes" in p or "destinationPortRanges" in p):
                    fail(f"azure: NSG rule {rule.get('name')} allows more than listenPort from allowFrom")
        if r["type"].lower() == "microsoft.compute/virtualmachines":
            linux = r.get("properties", {}).get("osProfile", {}).get("linuxConfiguration", {})
            if linux.get("disablePasswordAuthentication") is not True:
                fail("azure: the VM must disable password authentication")
            check_custom_data(r, tpl)


def check_custom_data(vm, tpl):
    """Rebuilds the VM's cloud-init with sample values and checks what it writes."""
    expr = vm.get("properties", {}).get("osProfile", {}).get("customData", "")
    try:
        tree = parse(expr[1:-1])
    except ExprError:
        return  # reported above
    if tree[0] != "call" or tree[1].lower() != "base64" or tree[2][0][0] != "call" or tree[2][0][1].lower() != "format":
        return fail("azure: customData must be base64(format(...))")
    args = tree[2][0][2]
    first = args[0]
    lines = None
    if first[0] == "call" and first[1].lower() == "join" and first[2][0][0] == "call":
        lines = tpl.get("variables", {}).get(first[2][0][2][0][1])
    if not isinstance(lines, list):
        return fail("azure: customData's format string must be join(variables('…'), …) of a list of lines")
    samples = {
        "parameters('listenPort')": "7443", "subscription().subscriptionId": "00000000-0000-0000-0000-000000000000",
        "resourceGroup().name": "ferry", "parameters('location')": "westeurope",
        "parameters('dataDiskSizeGB')": "200", "parameters('packageUrl')": DEBS["/tmp/ferry-cloud.deb"],
        "parameters('tunnelPackageUrl')": DEBS["/tmp/ferry-tunnel.deb"],
    }
    values = [samples.get(unparse(a), "10.0.0.5") for a in args[1:]]
    text = "\n".join(lines).replace("{{", "\0").replace("}}", "\1")
    text = re.sub(r"\{(\d+)\}", lambda m: values[int(m.group(1))], text).replace("\0", "{").replace("\1", "}")
    if not text.startswith("#cloud-config\n"):
        return fail("azure: customData is not a #cloud-config")
    try:
        conf = yaml.safe_load(text)
    except yaml.YAMLError as e:
        return fail(f"azure: cloud-init YAML: {e}")
    files = {f.get("path"): f.get("content", "") for f in conf.get("write_files", [])}
    if "/etc/ferry/cloud.toml" not in files:
        return fail("azure: cloud-init writes no /etc/ferry/cloud.toml")
    before = len(problems)
    check_toml("azure: cloud-init", files["/etc/ferry/cloud.toml"], "azure")
    runcmd = json.dumps(conf.get("runcmd") or [])
    if runcmd == "[]":
        fail("azure: cloud-init runcmd runs nothing")
    for path, content in files.items():
        if content.startswith("#!/bin/bash"):
            check_bash(f"azure: cloud-init {path}", content)
            check_install(f"azure: cloud-init {path}", content)
            if path not in runcmd:
                fail(f"azure: cloud-init writes {path} but runcmd never runs it")
    if len(problems) == before:
        ok(f"azure: cloud-init parses, its scripts pass bash -n and run, its cloud.toml has only known keys and data_dir {DATA_DIR}")
        ok("azure: the setup script downloads both .debs from packageUrl/tunnelPackageUrl and installs them in one apt call")


check_aws()
check_azure()
if problems:
    sys.stdout.flush()  # keep the summary after the FAIL lines when piped
    print(f"check-templates: {len(problems)} problem(s)", file=sys.stderr)
    sys.exit(1)
PY

if [ "$status" -ne 0 ]; then
  echo "check-templates: FAILED" >&2
  exit 1
fi
echo "check-templates: all templates ok"
