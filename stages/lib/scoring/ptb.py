"""COCO caption tokenization without a JVM: Stanford PTBTokenizer (CoreNLP 3.4.1, `-preserveLines -lowerCase`, as
pycocoevalcap calls it) followed by pycocoevalcap's removal of punctuation tokens.

A longest-match lexer like the JFlex PTBLexer: at each position every rule is tried and the longest match wins, the
earlier rule on a tie; a rule's trailing context (`r1/r2` in JFlex) counts towards its length but is not consumed.
Rules and normalisations follow PTBLexer.flex as observed from the 3.4.1 jar (tests compare against that jar): no
Americanisation, no escaping of / and *, parentheses/brackets become -LRB-/-LSB-... (then lowercased, so pycocoevalcap's
"-LRB-" punctuation entry never matches and "-lrb-" survives), £ becomes #, quotes become `` '' ` ', clitics split.
"""
from __future__ import annotations

import re

# pycocoevalcap/tokenizer/ptbtokenizer.py PUNCTUATIONS (compared after lowercasing, so the -XRB- entries are dead).
_PUNCT = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}

# JFlex [:letter:]: Python letters less the numeric "No" characters (½, ², ...) Python counts as alphanumeric.
_L = r"(?:(?![\u00B2\u00B3\u00B9\u00BC-\u00BE\u2070-\u2089\u2150-\u218F\u2460-\u24FF])[^\W\d_])"
_LD = r"[^\W_]"  # letter or digit
_APOS = r"(?:['\u0092\u2019]|&apos;)"
_APOSETC = r"(?:['\u0092\u2019\u0091\u2018\u201B]|&apos;)"
_SPACE = r"[ \t\u00A0\u2000-\u200A\u3000]"
_NL = r"(?:\r\n|[\r\n\u2028\u2029\x0b\x0c\x85])"
_SPACENL = rf"(?:{_SPACE}|{_NL})"
_SGML = r"</?[A-Za-z!][^>]*>"
_WORD = rf"(?:{_L}|&[aeiouAEIOU](?:acute|grave|uml);|[\u00AD\u0300-\u036F])+"
_ACRO = r"[A-Za-z](?:\.[A-Za-z])+"
_HYPHEN = r"[-_\u058A\u2010\u2011]"
_DIGIT = r"\d"
_NUM = rf"(?:{_DIGIT}*(?:[.:,\u00AD\u066B\u066C]{_DIGIT}+)+|{_DIGIT}+)"
_THINGPART = rf"(?:[dDoOlL]{_APOSETC}{_LD})?{_LD}+"
_REDAUX = rf"{_APOS}(?i:[msd]|re|ve|ll)"
# Abbreviations after which a period stays in the token (PTBLexer ABBREV1..4; literals are caseless there).
_ABBREV = (r"(?:(?i:jan|feb|mar|apr|jun|jul|aug|sept?|oct|nov|dec|mon|tues?|wed|thu|thurs|fri|etc|al|seq|inc|cos?|corp"
           r"|pp?tys?|ltd|plc|bancorp|dept|bhd|assn|univ|intl|sys|jr|sr|bros|blvd|rd|esq|mrs?|ms|drs?|profs?|sens?|reps?"
           r"|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt|cpl|pvt|mt|capt|ste?|ave|pres|lieut|hon|brig|co?mdr|pfc|spc"
           r"|supts?|det|vs|alex|wm|jos|cie|cf|invt|elec|natl|m[ft]g)|[A-Za-z])")
# Words after which a period-final acronym also ends the sentence (PTBLexer ACRONYM rule; first letter case-sensitive).
_SENT_STARTERS = ("About According Additionally After An A As At But Earlier He Her Here However If In It Last Many More "
                  "Mr. Ms. Now Once One Other Our She Since So Some Such That The Then There These They This We When "
                  "While What Yet You").split()
_STARTER = "|".join(w[0] + "(?i:" + re.escape(w[1:]) + ")" if len(w) > 1 else w for w in _SENT_STARTERS)

_CURRENCY = str.maketrans({"\u00A2": "cents", "\u00A3": "#", "\u0080": "$", "\u00A4": "$", "\u20A0": "$", "\u20AC": "$"})
_FRACTIONS = {"\u00BC": "1/4", "\u00BD": "1/2", "\u00BE": "3/4", "\u2153": "1/3"}
_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}


def _quote(tok: str, left: bool) -> str:
    """PTBLexer latexQuotes(): ASCII quotes by position, curly ones by shape."""
    tok = re.sub("&apos;|'", "`" if left else "'", tok)
    tok = re.sub('"|&quot;', "``" if left else "''", tok)
    tok = re.sub("[\u0091\u2018\u201B\u2039]", "`", tok)
    tok = re.sub("[\u0092\u2019\u203A]", "'", tok)
    tok = re.sub("[\u0093\u201C\u00AB]", "``", tok)
    return re.sub("[\u0094\u201D\u00BB]", "''", tok)


# (regex, token length or None for the whole group 1, transform); group 1 is the token, the rest trailing context.
_RULES = [
    (r"((?i:can))(?i:not)|((?i:gon|wan))(?i:na)|((?i:got))(?i:ta)|((?i:lem|gim))(?i:me)", None),
    (rf"({_SGML})", None),
    (r"(&(?:MD|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015])", lambda t: "--"),
    (r"(&amp;)", lambda t: "&"),
    (rf"({_WORD}){_REDAUX}", None),
    (rf"([A-Za-z\u00AD]*[A-MO-Za-mo-z]\u00AD*)[nN]{_APOSETC}[tT]", None),
    (rf"({_WORD})", None),
    (rf"({_APOS}n{_APOS}?|[lLdDjJ]{_APOS}|{_APOS}(?i:em|till?|cause|[2-9]0s)|[A-HJ-XZn]{_APOSETC}{_L}{{2}}{_L}*"
     rf"|{_L}+[aeiouyAEIOUY]{_APOSETC}[aeiouA-Z]{_L}*)", None),
    (rf"(y{_APOS}){_L}", None),
    (r"(https?://[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-])", None),
    (r"([a-zA-Z0-9][^ \t\n\f\r\"<>|()\u00A0]*@(?:[^ \t\n\f\r\"<>|().\u00A0]+\.)+[a-zA-Z]{2,4})", None),
    (rf"({_REDAUX})[^A-Za-z]", lambda t: _quote(t, False)),
    (rf"([nN]{_APOSETC}[tT])", lambda t: _quote(t, False)),
    (rf"({_DIGIT}{{1,2}}[-/]{_DIGIT}{{1,2}}[-/]{_DIGIT}{{2,4}})", None),
    (rf"([-+]?{_NUM})", lambda t: t.replace("\u00AD", "")),
    (rf"((?:{_DIGIT}{{1,4}}[- \u00A0])?{_DIGIT}{{1,4}}(?:\\?/|\u2044){_DIGIT}{{1,4}})", lambda t: t.replace(" ", "\u00A0")),
    (r"([\u00BC\u00BD\u00BE\u2153])", lambda t: _FRACTIONS[t]),
    (rf"(-(?:RRB|LRB|RCB|LCB|RSB|LSB)-|C\.D\.s|pro-|anti-|S(?:&|&amp;)P-500|S(?:&|&amp;)Ls|Cap{_APOS}n|c{_APOS}est)",
     lambda t: t.replace("&amp;", "&")),
    (r"([A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2})", None),
    (r"([A-Z]*\$|#)", None),
    (r"([\u00A2\u00A3\u00A4\u00A5\u0080\u20A0\u20AC\u060B\u0E3F\u20A4\uFFE0\uFFE1\uFFE5\uFFE6])",
     lambda t: t.translate(_CURRENCY)),
    # A period-final acronym before a sentence starter, or at the end of the line, is returned with its period and
    # the period once more as a token (PTBTokenizer's default, non-strictTreebank3 behaviour).
    (rf"({_ACRO}\.){_SPACE}+(?:{_STARTER}){_SPACE}", "dup"),
    (rf"({_ACRO}\.)(?={_SPACE}*$)", "dup"),
    (rf"({_ABBREV}\.)", None),
    (rf"({_ACRO}\.)", None),
    (rf"({_ACRO}){_SPACENL}", None),
    (rf"({_APOS}[0-9][0-9]){_SPACENL}", None),
    (rf"({_WORD}\.)[,;:]", None),
    (r"((?:\([0-9]{3}\)[ \u00A0]?|[0-9]{3}[- \u00A0.])[0-9]{3}[- \u00A0.][0-9]{4})",
     lambda t: t.replace(" ", "\u00A0").replace("(", "-LRB-").replace(")", "-RRB-")),
    (r'("|&quot;)[A-Za-z0-9$]', lambda t: _quote(t, True)),
    (r'("|&quot;)', lambda t: _quote(t, False)),
    (r"([+%&\u2030\u2031~^])", None),
    (r"([()\[\]{}])", lambda t: _BRACKETS[t]),
    (r"(-+)", lambda t: "--" if 3 <= len(t) <= 4 else t),
    (r"(\.{3,5}|(?:\.[ \u00A0]){2,4}\.|[\u0085\u2026])", lambda t: "..."),
    (r"(@+|#+|_+|\*+|(?:\\\*){1,3})", None),
    (r"([,;:=/<>]|[?!]+|[.\u00A1\u00BF\u037E\u0589\u061F\u06D4\u0700-\u0702\u07FA])", None),
    (r"([A-Za-z0-9][A-Za-z0-9.,\u00AD]*(?:-(?:[A-Za-z0-9\u00AD]+|" + _ACRO + r"\.))+)\.[,;:]", None),
    (r"([A-Za-z0-9][A-Za-z0-9.,\u00AD]*(?:-(?:[A-Za-z0-9\u00AD]+|" + _ACRO + r"\.))+)", None),
    (rf"({_THINGPART}(?:{_HYPHEN}{_THINGPART})*)\.[,;:]", None),
    (rf"({_THINGPART}(?:{_HYPHEN}{_THINGPART})*)", None),
    (r"([A-Z]+(?:(?:[+&]|&amp;)[A-Z]+)+)", lambda t: t.replace("&amp;", "&")),
    # Observed in 3.4.1 (not in older PTBLexer.flex): letters joined by periods stay one token, "centre.It", "x.co.uk".
    (rf"({_L}+(?:\.{_L}{_LD}*)+)", None),
    (r"('|&apos;)[A-Za-z][^ \t\n\r\u00A0]", lambda t: _quote(t, True)),
    (rf"({_REDAUX})", lambda t: _quote(t, False)),
    (rf"({_APOS}|''|[`\u2018\u2019\u201A\u201B\u201C\u201D\u0091\u0092\u0093\u0094\u201E\u201F\u2039\u203A\u00AB\u00BB]{{1,2}})",
     lambda t: _quote(t, False)),
    (r"([\u00A6-\u00A9\u00AC\u00AE-\u00B3\u00B4-\u00BA\u00D7\u00F7\u2020-\u2023\u2032-\u2038\u2044\u2100-\u214F"
     r"\u2190-\u21FF\u2200-\u22FF\u2600-\u26FF])", None),
]
_COMPILED = [(re.compile(rx), act) for rx, act in _RULES]
_SKIP = re.compile(rf"(?:{_SPACE}|{_NL}|[\x00\u200B\u200E\u200F\uFEFF|\\])+")
# The common case, a plain word before a space or the end: every rule yields the word itself ("cannot" excepted).
_PLAIN = re.compile(r"[A-Za-z]+(?= |$)")
_SPLIT_WORDS = {"cannot", "gonna", "gotta", "wanna", "lemme", "gimme"}


def ptb_tokens(line: str) -> list[str]:
    """PTBTokenizer tokens of one line (before lowercasing); characters no rule knows are dropped, as PTBLexer does."""
    out, pos, n = [], 0, len(line)
    while pos < n:
        m = _SKIP.match(line, pos)
        if m:
            pos = m.end()
            continue
        m = _PLAIN.match(line, pos)
        if m and m.group().lower() not in _SPLIT_WORDS:
            out.append(m.group())
            pos = m.end()
            continue
        best, best_len, best_act = None, 0, None
        for rx, act in _COMPILED:
            m = rx.match(line, pos)
            if m and len(m.group()) > best_len:
                best, best_len, best_act = m, len(m.group()), act
        if best is None:
            pos += 1  # untokenizable character: deleted (PTBLexer's default "firstDelete")
            continue
        tok = next(g for g in best.groups() if g is not None)
        pos += len(tok)
        if best_act == "dup":
            out.append(tok)
            pos -= 1  # the period is lexed again as a token of its own
        else:
            out.append(best_act(tok) if best_act else tok)
    return out


def coco_tokenize(text: str) -> str:
    """What pycocoevalcap's PTBTokenizer returns for one caption: lowercased tokens, punctuation tokens removed."""
    # pycocoevalcap splits the tokenizer's output on single spaces only; tokens may hold U+00A0 (fractions, phones).
    tokens = (t.lower() for t in ptb_tokens(text.replace("\n", " ")))
    return " ".join(t for t in tokens if t not in _PUNCT)
