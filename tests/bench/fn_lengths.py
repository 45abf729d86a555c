#!/usr/bin/env python3
"""List every non-test fn in *.rs under a tree with its length (fn line to closing brace), longest first."""
import os, re, sys

root = sys.argv[1] if len(sys.argv) > 1 else "."
top = int(sys.argv[2]) if len(sys.argv) > 2 else 30

FN_RE = re.compile(r'^\s*(?:pub(?:\([^)]*\))?\s+)?(?:default\s+)?(?:const\s+)?(?:async\s+)?(?:unsafe\s+)?(?:extern\s+"[^"]*"\s+)?fn\s+([A-Za-z_][A-Za-z0-9_]*)')

def strip(src):
    """Replace comments, strings and char literals with spaces, keeping newlines."""
    out = []
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i)); i = j
        elif src.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if src.startswith("/*", j): depth += 1; j += 2
                elif src.startswith("*/", j): depth -= 1; j += 2
                else: j += 1
            out.append(re.sub(r"[^\n]", " ", src[i:j])); i = j
        else:
            m = re.match(r'b?r(#*)"', src[i:i+300])
            if m and (i == 0 or not (src[i-1].isalnum() or src[i-1] == "_")):
                end = '"' + m.group(1)
                j = src.find(end, i + m.end())
                j = n if j < 0 else j + len(end)
                out.append(re.sub(r"[^\n]", " ", src[i:j])); i = j
            elif c == '"' or (c == 'b' and src.startswith('b"', i) and (i == 0 or not (src[i-1].isalnum() or src[i-1] == "_"))):
                j = i + (2 if c == 'b' else 1)
                while j < n and src[j] != '"':
                    j += 2 if src[j] == "\\" else 1
                j += 1
                out.append(re.sub(r"[^\n]", " ", src[i:j])); i = j
            elif c == "'":
                m = re.match(r"'(\\.[^']*|[^\\'])'", src[i:i+12])
                if m:
                    out.append(" " * m.end()); i += m.end()
                else:
                    out.append(c); i += 1  # lifetime
            else:
                out.append(c); i += 1
    return "".join(out)

def match_brace(text, start):
    depth = 0
    for k in range(start, len(text)):
        if text[k] == "{": depth += 1
        elif text[k] == "}":
            depth -= 1
            if depth == 0: return k
    return len(text) - 1

def test_ranges(text):
    """Char ranges of items annotated #[cfg(test)] or #[test]."""
    ranges = []
    for m in re.finditer(r"#\[\s*(cfg\s*\(\s*test\s*\)|test|tokio::test[^\]]*)\s*\]", text):
        # next item body: first '{' or ';' after the attribute
        k = m.end()
        while k < len(text) and text[k] not in "{;": k += 1
        if k < len(text) and text[k] == "{":
            ranges.append((m.start(), match_brace(text, k)))
    return ranges

def scan(path):
    src = open(path, encoding="utf-8", errors="replace").read()
    text = strip(src)
    tr = test_ranges(text)
    lines = text.split("\n")
    offs, o = [], 0
    for l in lines:
        offs.append(o); o += len(l) + 1
    res = []
    for ln, line in enumerate(lines):
        m = FN_RE.match(line)
        if not m: continue
        pos = offs[ln] + m.start(1)
        if any(a <= pos <= b for a, b in tr): continue
        # find body '{' (skip declarations ending in ';')
        k = pos
        paren = 0
        while k < len(text):
            ch = text[k]
            if ch in "([": paren += 1
            elif ch in ")]": paren -= 1
            elif paren == 0 and ch in "{;": break
            k += 1
        if k >= len(text) or text[k] == ";": continue
        end = match_brace(text, k)
        endln = text.count("\n", 0, end)
        res.append((endln - ln + 1, os.path.relpath(path, root), ln + 1, m.group(1)))
    return res

out = []
for d, dirs, files in os.walk(root):
    dirs[:] = [x for x in dirs if x not in ("target", "tests", ".git")]
    for f in files:
        if f.endswith(".rs"):
            out += scan(os.path.join(d, f))
out.sort(key=lambda r: -r[0])
for n, p, l, name in out[:top]:
    print(f"{n:5d}  {p}:{l}  {name}")
over = [r for r in out if r[0] >= 120]
print(f"-- {len(out)} fns, {len(over)} at 120 lines or more")
