//! `tidegate import-nginx`: reads an nginx configuration (the whole tree, `include`s
//! followed) and writes the equivalent tidegate TOML, with a report of what could not be
//! carried over and why.
//!
//! Two halves:
//! - the parser ([`parse`]) turns nginx's syntax into [`Directive`]s, each with its file and
//!   line. It follows `ngx_conf_read_token`: words, single- and double-quoted strings with the
//!   `\"`, `\'`, `\\`, `\t`, `\r`, `\n` escapes, `#` comments, `${var}` inside words, `;`,
//!   `{` and `}`; OpenResty's `*_by_lua_block { ... }` bodies are skipped as raw Lua.
//!   [`import`] and [`import_str`] also expand `include` (with globs), the way nginx does:
//!   relative to the main file's directory (nginx's conf prefix).
//! - the converter walks `http {}` and `stream {}` and builds the TOML text, one comment per
//!   item naming its nginx source (`# nginx.conf:42`), plus [`Note`]s: what converted with a
//!   caveat (`Warning`) and what could not be converted although it affects routing or
//!   balancing (`Unsupported`). Directives unrelated to proxying are listed as [`Skipped`].
//!
//! Nothing here panics on any input: the fuzzer (`fuzz/fuzz_targets/nginx.rs`) checks that.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use super::Cidr;

/// Deepest block nesting accepted (real configs stay under 10).
const MAX_DEPTH: usize = 64;
/// Deepest `include` chain accepted (a file including itself hits this).
const MAX_INCLUDE_DEPTH: usize = 16;
/// Most files one import may read.
const MAX_FILES: usize = 2048;

// =======================================================================================
// Parser
// =======================================================================================

/// One word of a directive, unescaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arg {
    pub value: String,
    /// Written in quotes (`"..."` or `'...'`).
    pub quoted: bool,
    /// Line the word starts on.
    pub line: usize,
}

/// A directive: `name args...;` or `name args... { block }`.
#[derive(Debug, Clone)]
pub struct Directive {
    pub name: String,
    pub args: Vec<Arg>,
    /// The file it was read from (includes keep their own file).
    pub file: Arc<Path>,
    pub line: usize,
    /// The directives inside `{ ... }`; `None` for a simple directive.
    pub block: Option<Vec<Directive>>,
}

impl Directive {
    /// Argument `i` (0-based, after the name).
    pub fn arg(&self, i: usize) -> Option<&str> {
        self.args.get(i).map(|a| a.value.as_str())
    }

    fn loc(&self) -> Loc {
        Loc { file: self.file.clone(), line: self.line }
    }

    fn children(&self) -> &[Directive] {
        self.block.as_deref().unwrap_or_default()
    }

    /// The directive as written, shortened: `proxy_pass http://chat`.
    fn text(&self) -> String {
        let mut s = self.name.clone();
        for a in &self.args {
            s.push(' ');
            if a.quoted || a.value.is_empty() || a.value.contains(char::is_whitespace) {
                let _ = write!(s, "{:?}", a.value);
            } else {
                s.push_str(&a.value);
            }
        }
        if s.chars().count() > 80 {
            s = s.chars().take(77).collect::<String>() + "...";
        }
        s
    }
}

/// A syntax error, a bad include or an unreadable file, located as `FILE:LINE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub file: PathBuf,
    /// 1-based; 0 when unknown.
    pub line: usize,
    pub message: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(f, "{}:{}: {}", self.file.display(), self.line, self.message)
        }
    }
}

impl std::error::Error for Error {}

/// Where files come from: the disk ([`DiskFs`]), memory ([`MemFs`], for tests), or any
/// `Fn(&Path) -> io::Result<String>` (which cannot list directories, so globs fail).
pub trait Fs {
    fn read(&self, path: &Path) -> io::Result<String>;
    /// Entries of a directory: (file name, is a directory).
    fn list(&self, dir: &Path) -> io::Result<Vec<(String, bool)>>;
}

impl<F: Fn(&Path) -> io::Result<String>> Fs for F {
    fn read(&self, path: &Path) -> io::Result<String> {
        self(path)
    }
    fn list(&self, _dir: &Path) -> io::Result<Vec<(String, bool)>> {
        Err(io::Error::new(io::ErrorKind::Unsupported, "cannot list directories"))
    }
}

/// The real file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct DiskFs;

impl Fs for DiskFs {
    fn read(&self, path: &Path) -> io::Result<String> {
        let bytes = std::fs::read(path)?;
        Ok(String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<(String, bool)>> {
        let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false) || e.path().is_dir();
            out.push((e.file_name().to_string_lossy().into_owned(), is_dir));
        }
        Ok(out)
    }
}

/// Files held in memory, keyed by path (for tests and tools).
#[derive(Debug, Clone, Default)]
pub struct MemFs {
    files: BTreeMap<PathBuf, String>,
}

impl MemFs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a file.
    pub fn with(mut self, path: impl Into<PathBuf>, text: impl Into<String>) -> Self {
        self.files.insert(path.into(), text.into());
        self
    }
}

impl Fs for MemFs {
    fn read(&self, path: &Path) -> io::Result<String> {
        self.files.get(&normalize(path)).cloned().ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "No such file or directory"))
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<(String, bool)>> {
        let dir = normalize(dir);
        let mut out: BTreeMap<String, bool> = BTreeMap::new();
        for p in self.files.keys() {
            let Ok(rest) = p.strip_prefix(&dir) else { continue };
            let mut comps = rest.components();
            if let Some(Component::Normal(first)) = comps.next() {
                let is_dir = comps.next().is_some();
                let e = out.entry(first.to_string_lossy().into_owned()).or_insert(is_dir);
                *e |= is_dir;
            }
        }
        if out.is_empty() {
            return Err(io::Error::new(io::ErrorKind::NotFound, "No such file or directory"));
        }
        Ok(out.into_iter().collect())
    }
}

/// `a/./b/../c` → `a/c` (lexically; for in-memory lookups).
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// A lexical token.
#[derive(Debug)]
enum Token {
    Word(Arg),
    Semi(usize),
    Open(usize),
    Close(usize),
    Eof(usize),
}

/// nginx's tokenizer (`ngx_conf_read_token`), byte by byte.
struct Lexer<'a> {
    src: &'a [u8],
    pos: usize,
    line: usize,
    file: &'a Path,
}

impl<'a> Lexer<'a> {
    fn new(text: &'a str, file: &'a Path) -> Self {
        Lexer { src: text.as_bytes(), pos: 0, line: 1, file }
    }

    fn err(&self, line: usize, message: impl Into<String>) -> Error {
        Error { file: self.file.to_path_buf(), line, message: message.into() }
    }

    fn peek(&self) -> Option<u8> {
        self.src.get(self.pos).copied()
    }

    fn next_token(&mut self) -> Result<Token, Error> {
        loop {
            let Some(c) = self.peek() else { return Ok(Token::Eof(self.line)) };
            match c {
                b'\n' => {
                    self.line += 1;
                    self.pos += 1;
                }
                b' ' | b'\t' | b'\r' => self.pos += 1,
                b'#' => {
                    while self.peek().is_some_and(|c| c != b'\n') {
                        self.pos += 1;
                    }
                }
                _ => break,
            }
        }
        let line = self.line;
        let Some(c) = self.peek() else { return Ok(Token::Eof(line)) };
        match c {
            b';' => {
                self.pos += 1;
                Ok(Token::Semi(line))
            }
            b'{' => {
                self.pos += 1;
                Ok(Token::Open(line))
            }
            b'}' => {
                self.pos += 1;
                Ok(Token::Close(line))
            }
            b'"' | b'\'' => self.quoted(c),
            _ => self.bare(),
        }
    }

    /// Handles a backslash at `self.pos`: pushes the unescaped bytes, advances past them.
    fn escape(&mut self, out: &mut Vec<u8>) {
        let next = self.src.get(self.pos + 1).copied();
        match next {
            Some(c @ (b'"' | b'\'' | b'\\')) => {
                out.push(c);
                self.pos += 2;
            }
            Some(b't') => {
                out.push(b'\t');
                self.pos += 2;
            }
            Some(b'r') => {
                out.push(b'\r');
                self.pos += 2;
            }
            Some(b'n') => {
                out.push(b'\n');
                self.pos += 2;
            }
            Some(c) => {
                // Any other escaped byte stays as written, backslash included, but is part
                // of the word whatever it is (a space, `;`, a quote).
                out.push(b'\\');
                out.push(c);
                if c == b'\n' {
                    self.line += 1;
                }
                self.pos += 2;
            }
            None => {
                out.push(b'\\');
                self.pos += 1;
            }
        }
    }

    fn quoted(&mut self, quote: u8) -> Result<Token, Error> {
        let line = self.line;
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            let Some(c) = self.peek() else {
                let q = quote as char;
                return Err(self.err(line, format!("unterminated quoted string: the {q}...{q} opened on line {line} is never closed")));
            };
            match c {
                b'\\' => {
                    if self.pos + 1 >= self.src.len() {
                        let q = quote as char;
                        return Err(
                            self.err(line, format!("unterminated quoted string: the {q}...{q} opened on line {line} is never closed"))
                        );
                    }
                    self.escape(&mut out);
                }
                c if c == quote => {
                    self.pos += 1;
                    break;
                }
                b'\n' => {
                    self.line += 1;
                    out.push(c);
                    self.pos += 1;
                }
                _ => {
                    out.push(c);
                    self.pos += 1;
                }
            }
        }
        // nginx wants a separator after a closing quote.
        match self.peek() {
            None | Some(b' ' | b'\t' | b'\r' | b'\n' | b';' | b'{' | b')') => {}
            Some(c) => {
                let shown = if c.is_ascii_graphic() { format!("{:?}", c as char) } else { format!("byte 0x{c:02x}") };
                return Err(self.err(self.line, format!("unexpected {shown} after a quoted string; expected a space, \";\" or \"{{\"")));
            }
        }
        Ok(Token::Word(Arg { value: bytes_to_string(out), quoted: true, line }))
    }

    fn bare(&mut self) -> Result<Token, Error> {
        let line = self.line;
        let mut out = Vec::new();
        let mut variable = false;
        while let Some(c) = self.peek() {
            match c {
                b'{' if variable => {
                    out.push(c);
                    self.pos += 1;
                    variable = false;
                    continue;
                }
                b' ' | b'\t' | b'\r' | b'\n' | b';' | b'{' => break,
                b'\\' => {
                    self.escape(&mut out);
                    variable = false;
                    continue;
                }
                _ => {
                    out.push(c);
                    self.pos += 1;
                }
            }
            variable = c == b'$';
        }
        Ok(Token::Word(Arg { value: bytes_to_string(out), quoted: false, line }))
    }

    /// Skips an OpenResty `*_by_lua_block { ... }` body (the `{` is consumed): Lua strings,
    /// long brackets and comments may hold braces.
    fn skip_lua(&mut self, open_line: usize) -> Result<(), Error> {
        let mut depth = 1usize;
        while let Some(c) = self.peek() {
            match c {
                b'\n' => {
                    self.line += 1;
                    self.pos += 1;
                }
                b'{' => {
                    depth += 1;
                    self.pos += 1;
                }
                b'}' => {
                    depth -= 1;
                    self.pos += 1;
                    if depth == 0 {
                        return Ok(());
                    }
                }
                b'"' | b'\'' => {
                    self.pos += 1;
                    while let Some(d) = self.peek() {
                        self.pos += 1;
                        match d {
                            b'\\' => self.pos += 1,
                            b'\n' => self.line += 1,
                            d if d == c => break,
                            _ => {}
                        }
                    }
                }
                b'-' if self.src.get(self.pos + 1) == Some(&b'-') => {
                    self.pos += 2;
                    if !self.long_bracket() {
                        while self.peek().is_some_and(|c| c != b'\n') {
                            self.pos += 1;
                        }
                    }
                }
                b'[' => {
                    if !self.long_bracket() {
                        self.pos += 1;
                    }
                }
                _ => self.pos += 1,
            }
        }
        Err(self.err(open_line, format!("unexpected end of file: the Lua block opened on line {open_line} is never closed")))
    }

    /// A Lua long bracket `[[...]]` / `[==[...]==]` at `pos`: skips it and returns true.
    fn long_bracket(&mut self) -> bool {
        if self.peek() != Some(b'[') {
            return false;
        }
        let mut i = self.pos + 1;
        let mut level = 0;
        while self.src.get(i) == Some(&b'=') {
            level += 1;
            i += 1;
        }
        if self.src.get(i) != Some(&b'[') {
            return false;
        }
        let mut close = vec![b']'];
        close.extend(std::iter::repeat_n(b'=', level));
        close.push(b']');
        self.pos = i + 1;
        while self.pos < self.src.len() {
            if self.src[self.pos..].starts_with(&close) {
                self.pos += close.len();
                return true;
            }
            if self.src[self.pos] == b'\n' {
                self.line += 1;
            }
            self.pos += 1;
        }
        true
    }
}

fn bytes_to_string(b: Vec<u8>) -> String {
    String::from_utf8(b).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Directive names that, found at the start of a line inside another directive's
/// arguments, almost surely mean the previous line lacks its `;`.
const LINE_STARTERS: &[&str] = &[
    "listen",
    "server",
    "server_name",
    "location",
    "upstream",
    "proxy_pass",
    "proxy_set_header",
    "proxy_read_timeout",
    "proxy_connect_timeout",
    "proxy_send_timeout",
    "proxy_http_version",
    "keepalive",
    "least_conn",
    "ip_hash",
    "hash",
    "zone",
    "include",
    "root",
    "index",
    "return",
    "rewrite",
    "ssl_certificate",
    "ssl_certificate_key",
    "ssl_protocols",
    "access_log",
    "error_log",
    "client_max_body_size",
    "worker_processes",
    "worker_connections",
    "sticky",
    "check",
];

/// How included files are found.
struct Includes<'a> {
    fs: &'a dyn Fs,
    /// nginx's conf prefix: the main file's directory.
    prefix: PathBuf,
    files: usize,
    notes: Vec<Note>,
}

/// Parses one file's text into directives. `include` directives are kept as they are (use
/// [`import`] or [`import_str`] to follow them).
pub fn parse(text: &str, path: &Path) -> Result<Vec<Directive>, Error> {
    parse_file(text, path, None, 0)
}

fn parse_file(text: &str, path: &Path, mut includes: Option<&mut Includes<'_>>, include_depth: usize) -> Result<Vec<Directive>, Error> {
    let file: Arc<Path> = Arc::from(path);
    let mut lex = Lexer::new(text, path);
    // Open blocks: the directive (without its block yet) and the children read so far.
    let mut stack: Vec<(Directive, Vec<Directive>)> = Vec::new();
    let mut top: Vec<Directive> = Vec::new();
    let mut words: Vec<Arg> = Vec::new();
    loop {
        match lex.next_token()? {
            Token::Word(a) => {
                if let (Some(first), Some(prev)) = (words.first(), words.last())
                    && a.line > prev.line
                    && !a.quoted
                    && LINE_STARTERS.contains(&a.value.as_str())
                    && !matches!(first.value.as_str(), "log_format" | "add_header" | "more_set_headers" | "map")
                {
                    return Err(lex.err(
                        prev.line,
                        format!(
                            "missing \";\" at the end of line {}: directive \"{}\" runs on into \"{}\" on line {}",
                            prev.line, first.value, a.value, a.line
                        ),
                    ));
                }
                words.push(a);
            }
            Token::Semi(line) => {
                if words.is_empty() {
                    return Err(lex.err(line, "unexpected \";\""));
                }
                let d = make_directive(std::mem::take(&mut words), &file, None);
                let into = match stack.last_mut() {
                    Some((_, children)) => children,
                    None => &mut top,
                };
                match includes.as_deref_mut() {
                    Some(inc) if d.name == "include" => {
                        let mut spliced = inc.include(&d, include_depth)?;
                        into.append(&mut spliced);
                    }
                    _ => into.push(d),
                }
            }
            Token::Open(line) => {
                if words.is_empty() {
                    return Err(lex.err(line, "unexpected \"{\""));
                }
                if stack.len() >= MAX_DEPTH {
                    return Err(lex.err(line, format!("blocks nested more than {MAX_DEPTH} deep")));
                }
                let d = make_directive(std::mem::take(&mut words), &file, None);
                if d.name.ends_with("_by_lua_block") {
                    lex.skip_lua(line)?;
                    let d = Directive { block: Some(Vec::new()), ..d };
                    match stack.last_mut() {
                        Some((_, children)) => children.push(d),
                        None => top.push(d),
                    }
                } else {
                    stack.push((d, Vec::new()));
                }
            }
            Token::Close(line) => {
                if let Some(first) = words.first() {
                    return Err(lex
                        .err(line, format!("unexpected \"}}\": missing \";\" after directive \"{}\" (line {})", first.value, first.line)));
                }
                let Some((mut d, children)) = stack.pop() else {
                    return Err(lex.err(line, "unexpected \"}\": no block is open"));
                };
                d.block = Some(children);
                match stack.last_mut() {
                    Some((_, c)) => c.push(d),
                    None => top.push(d),
                }
            }
            Token::Eof(line) => {
                if let Some(first) = words.first() {
                    return Err(lex.err(
                        first.line,
                        format!("unexpected end of file: missing \";\" after directive \"{}\" (line {})", first.value, first.line),
                    ));
                }
                if let Some((d, _)) = stack.last() {
                    return Err(lex.err(
                        line,
                        format!(
                            "unexpected end of file, expecting \"}}\": the \"{}\" block opened on line {} is not closed",
                            d.name, d.line
                        ),
                    ));
                }
                return Ok(top);
            }
        }
    }
}

fn make_directive(mut words: Vec<Arg>, file: &Arc<Path>, block: Option<Vec<Directive>>) -> Directive {
    let first = words.remove(0);
    Directive { name: first.value, args: words, file: file.clone(), line: first.line, block }
}

/// Include files nginx installs that never matter to proxying: a missing one is a warning.
const HARMLESS_INCLUDES: &[&str] =
    &["mime.types", "fastcgi_params", "fastcgi.conf", "scgi_params", "uwsgi_params", "koi-utf", "koi-win", "win-utf", "proxy_params"];

impl Includes<'_> {
    /// The directives of every file `include PATTERN` names, in glob order.
    fn include(&mut self, d: &Directive, depth: usize) -> Result<Vec<Directive>, Error> {
        let here = |message: String| Error { file: d.file.to_path_buf(), line: d.line, message };
        let Some(pattern) = d.arg(0).filter(|_| d.args.len() == 1) else {
            return Err(here("invalid number of arguments in \"include\": expected one file name or pattern".into()));
        };
        if depth >= MAX_INCLUDE_DEPTH {
            return Err(here(format!(
                "include \"{pattern}\": includes nested more than {MAX_INCLUDE_DEPTH} deep (does a file include itself?)"
            )));
        }
        if pattern.is_empty() {
            return Err(here("include: empty file name".into()));
        }
        let has_glob = pattern.contains(['*', '?', '[']);
        let raw = Path::new(pattern);
        // nginx resolves relative includes against the conf prefix (the main file's
        // directory), whichever file includes them; the including file's own directory is
        // tried second, for trees written with that convention.
        let mut candidates = vec![if raw.is_absolute() { raw.to_path_buf() } else { self.prefix.join(raw) }];
        if !raw.is_absolute()
            && let Some(dir) = d.file.parent()
            && dir != self.prefix
        {
            candidates.push(dir.join(raw));
        }
        let mut files = Vec::new();
        let mut first_err: Option<String> = None;
        for c in &candidates {
            if has_glob {
                match glob(self.fs, c) {
                    Ok(found) if !found.is_empty() => {
                        files = found;
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        first_err.get_or_insert_with(|| format!("include \"{pattern}\": cannot list {}: {e}", c.display()));
                    }
                }
            } else {
                match self.fs.read(c) {
                    Ok(text) => {
                        files.push(c.clone());
                        self.files += 1;
                        if self.files > MAX_FILES {
                            return Err(here(format!("more than {MAX_FILES} files included")));
                        }
                        return parse_file(&text, c, Some(self), depth + 1);
                    }
                    Err(e) => {
                        first_err.get_or_insert_with(|| format!("include \"{pattern}\": cannot read {}: {e}", c.display()));
                    }
                }
            }
        }
        if !has_glob {
            let base = raw.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if HARMLESS_INCLUDES.contains(&base) {
                self.notes.push(Note {
                    file: d.file.to_path_buf(),
                    line: d.line,
                    level: Level::Warning,
                    message: format!("include \"{pattern}\" not found; skipped (it only holds settings unrelated to proxying)"),
                });
                return Ok(Vec::new());
            }
            return Err(here(first_err.unwrap_or_else(|| format!("include \"{pattern}\": file not found"))));
        }
        if files.is_empty() {
            // nginx accepts a pattern that matches nothing.
            self.notes.push(Note {
                file: d.file.to_path_buf(),
                line: d.line,
                level: Level::Warning,
                message: match first_err {
                    Some(e) => format!("{e}; nothing included"),
                    None => format!("include \"{pattern}\" matches no file; nothing included"),
                },
            });
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for f in files {
            self.files += 1;
            if self.files > MAX_FILES {
                return Err(here(format!("more than {MAX_FILES} files included")));
            }
            let text = self.fs.read(&f).map_err(|e| here(format!("include \"{pattern}\": cannot read {}: {e}", f.display())))?;
            out.extend(parse_file(&text, &f, Some(self), depth + 1)?);
        }
        Ok(out)
    }
}

/// Files matching `pattern` (`*`, `?`, `[...]` in any component), sorted like glob(3) in
/// the C locale; names starting with `.` only match a pattern starting with `.`.
fn glob(fs: &dyn Fs, pattern: &Path) -> io::Result<Vec<PathBuf>> {
    let comps: Vec<Component<'_>> = pattern.components().collect();
    let mut bases: Vec<(PathBuf, bool)> = vec![(PathBuf::new(), true)];
    for (i, c) in comps.iter().enumerate() {
        let last = i + 1 == comps.len();
        let Component::Normal(name) = c else {
            for (b, _) in &mut bases {
                b.push(c.as_os_str());
            }
            continue;
        };
        let name = name.to_string_lossy();
        if !name.contains(['*', '?', '[']) {
            for (b, is_dir) in &mut bases {
                b.push(name.as_ref());
                *is_dir = false; // unknown; a literal last component is checked below
            }
            continue;
        }
        let mut next = Vec::new();
        for (b, _) in &bases {
            let entries = match fs.list(b) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let mut entries: Vec<(String, bool)> =
                entries.into_iter().filter(|(n, _)| (!n.starts_with('.') || name.starts_with('.')) && wildcard_match(&name, n)).collect();
            entries.sort();
            for (n, is_dir) in entries {
                if !last && !is_dir {
                    continue;
                }
                next.push((b.join(n), is_dir));
            }
        }
        bases = next;
        if bases.is_empty() {
            break;
        }
    }
    let mut out: Vec<PathBuf> = bases.into_iter().filter(|(_, is_dir)| !is_dir).map(|(p, _)| p).collect();
    out.sort();
    // A literal last component (`dir/*/site.conf`): keep only files that exist.
    if comps.last().is_some_and(|c| !c.as_os_str().to_string_lossy().contains(['*', '?', '['])) {
        out.retain(|p| fs.read(p).is_ok());
    }
    Ok(out)
}

/// fnmatch(3) without flags: `*`, `?`, `[abc]`, `[a-z]`, `[!x]` / `[^x]`.
fn wildcard_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        let step = match p.get(pi) {
            Some('*') => {
                star = Some((pi, ni));
                pi += 1;
                continue;
            }
            Some('?') => Some(1),
            Some('[') => class_match(&p[pi..], n[ni]),
            Some(&c) if c == n[ni] => Some(1),
            _ => None,
        };
        match step {
            Some(len) => {
                pi += len;
                ni += 1;
            }
            None => match star {
                Some((sp, sn)) => {
                    pi = sp + 1;
                    ni = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// A `[...]` class at the start of `p` against `c`: the class length when it matches.
/// An unterminated `[` is a literal `[`.
fn class_match(p: &[char], c: char) -> Option<usize> {
    let mut i = 1;
    let negate = matches!(p.get(1), Some('!' | '^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    while let Some(&ch) = p.get(i) {
        if ch == ']' && !first {
            return (matched != negate).then_some(i + 1);
        }
        first = false;
        if p.get(i + 1) == Some(&'-') && p.get(i + 2).is_some_and(|&e| e != ']') {
            let end = p[i + 2];
            if ch <= c && c <= end {
                matched = true;
            }
            i += 3;
        } else {
            if ch == c {
                matched = true;
            }
            i += 1;
        }
    }
    (c == '[').then_some(1)
}

/// The parts of a word: literal text and `$name` / `${name}` variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Text(String),
    Var(String),
}

/// Splits a word into text and variables, as nginx's script compiler does.
pub fn variables(word: &str) -> Vec<Part> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut chars = word.char_indices().peekable();
    while let Some((_, c)) = chars.next() {
        if c != '$' {
            text.push(c);
            continue;
        }
        let mut name = String::new();
        if chars.peek().is_some_and(|&(_, c)| c == '{') {
            chars.next();
            let mut closed = false;
            for (_, c) in chars.by_ref() {
                if c == '}' {
                    closed = true;
                    break;
                }
                name.push(c);
            }
            if !closed {
                text.push_str("${");
                text.push_str(&name);
                continue;
            }
        } else {
            while let Some(&(_, c)) = chars.peek() {
                if c.is_ascii_alphanumeric() || c == '_' {
                    name.push(c);
                    chars.next();
                } else {
                    break;
                }
            }
        }
        if name.is_empty() {
            text.push('$');
            continue;
        }
        if !text.is_empty() {
            out.push(Part::Text(std::mem::take(&mut text)));
        }
        out.push(Part::Var(name));
    }
    if !text.is_empty() {
        out.push(Part::Text(text));
    }
    out
}

/// The variable name when `word` is exactly one variable (`$x` or `${x}`).
fn single_var(word: &str) -> Option<String> {
    match variables(word).as_slice() {
        [Part::Var(v)] => Some(v.clone()),
        _ => None,
    }
}

fn has_vars(word: &str) -> bool {
    variables(word).iter().any(|p| matches!(p, Part::Var(_)))
}

// =======================================================================================
// Report
// =======================================================================================

/// How a directive was carried over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Converted; the message says what it became (or why nothing is needed).
    Converted,
    /// Converted with a difference in behaviour, or not carried over although it does not
    /// change where requests go.
    Warning,
    /// Not converted, and it changes routing, balancing or what is served.
    Unsupported,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Converted => "converted",
            Level::Warning => "warning",
            Level::Unsupported => "unsupported",
        }
    }
}

/// One remark about the conversion, at an nginx file and line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// Relative to the main file's directory when below it.
    pub file: PathBuf,
    pub line: usize,
    pub level: Level,
    pub message: String,
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}: {}", self.file.display(), self.line, self.level.name(), self.message)
    }
}

/// A directive unrelated to proxying, skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub file: PathBuf,
    pub line: usize,
    pub directive: String,
}

/// The result of an import: the TOML text and what to tell the user.
#[derive(Debug, Clone)]
pub struct Import {
    pub toml: String,
    /// In source order (file, line).
    pub notes: Vec<Note>,
    pub skipped: Vec<Skipped>,
}

impl Import {
    /// Everything that affects routing or balancing was converted (no `Unsupported` note).
    pub fn complete(&self) -> bool {
        !self.notes.iter().any(|n| n.level == Level::Unsupported)
    }

    /// What could not be carried over and why (warnings and unsupported items, one per
    /// line), then a one-line summary of the skipped directives.
    pub fn report(&self) -> String {
        let mut out = String::new();
        for n in self.notes.iter().filter(|n| n.level != Level::Converted) {
            let _ = writeln!(out, "{n}");
        }
        if !self.skipped.is_empty() {
            let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
            for s in &self.skipped {
                *counts.entry(s.directive.as_str()).or_default() += 1;
            }
            let list: Vec<String> = counts.iter().map(|(d, n)| if *n > 1 { format!("{d} (x{n})") } else { d.to_string() }).collect();
            let _ = writeln!(out, "skipped {} directive(s) unrelated to proxying: {}", self.skipped.len(), list.join(", "));
        }
        out
    }
}

/// Reads the nginx config at `path` (and every file it includes) and converts it.
pub fn import(path: &Path) -> Result<Import, Error> {
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let text = DiskFs.read(&path).map_err(|e| Error { file: path.clone(), line: 0, message: format!("cannot read nginx config: {e}") })?;
    import_str(&text, &path, &DiskFs)
}

/// Converts nginx config `text` read from `path`; includes are read through `fs` (relative
/// ones against `path`'s directory, like nginx's conf prefix).
pub fn import_str(text: &str, path: &Path, fs: &dyn Fs) -> Result<Import, Error> {
    let prefix = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut inc = Includes { fs, prefix: prefix.clone(), files: 1, notes: Vec::new() };
    let tree = parse_file(text, path, Some(&mut inc), 0)?;
    let mut cx = Cx::new(prefix, path.to_path_buf());
    for n in inc.notes {
        let file = cx.shown(&n.file);
        cx.notes.push(Note { file, ..n });
    }
    cx.main(&tree);
    Ok(cx.finish())
}

// =======================================================================================
// Converter: model
// =======================================================================================

#[derive(Debug, Clone)]
struct Loc {
    file: Arc<Path>,
    line: usize,
}

/// Where a directive sits, for classifying what it means there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ctx {
    Main,
    Http,
    Server,
    /// `proxies`: the location has a `proxy_pass` (else content directives are covered by
    /// the location's own note).
    Location {
        proxies: bool,
    },
    Upstream,
    Stream,
    StreamServer,
}

/// A `proxy_set_header`.
#[derive(Debug, Clone)]
struct Header {
    name: String,
    value: String,
    loc: Loc,
}

type Val<T> = Option<(T, Loc)>;

/// Settings inherited from `http` to `server` to `location` (or `stream` to `server`).
#[derive(Debug, Clone, Default)]
struct Scope {
    connect: Val<u64>,
    read: Val<u64>,
    send: Val<u64>,
    /// stream's `proxy_timeout`.
    stream_timeout: Val<u64>,
    tries: Val<u64>,
    next_upstream: Val<Vec<String>>,
    /// Array directives are inherited only by levels that set none of their own.
    headers: Vec<Header>,
    certs: Vec<(String, Loc)>,
    keys: Vec<(String, Loc)>,
    protocols: Val<Vec<String>>,
    ssl_on: bool,
    keepalive_timeout: Val<u64>,
    header_timeout: Val<u64>,
    body_timeout: Val<u64>,
    send_timeout: Val<u64>,
    underscores: Val<bool>,
    real_ip_from: Vec<(String, Loc)>,
    real_ip_header: Val<String>,
    ssl_verify: Val<bool>,
    ssl_trusted: Val<String>,
    ssl_name: Val<String>,
    ssl_server_name: bool,
    /// stream `proxy_protocol on` (send to servers).
    send_proxy: Option<Loc>,
    ssl_preread: bool,
    /// stream `proxy_ssl on`.
    proxy_ssl: Option<Loc>,
}

#[derive(Debug, Clone, PartialEq)]
enum Method {
    RoundRobin,
    LeastConn,
    IpHash,
    /// The tidegate key (`ip`, `header:X`, ...), and whether nginx hashed consistently.
    Hash {
        key: String,
        consistent: bool,
    },
    /// `random` (weighted random).
    Random,
    /// `random two [least_conn]`.
    RandomTwo,
}

#[derive(Debug, Clone)]
struct Srv {
    addr: String,
    weight: u32,
    max_fails: Option<u32>,
    fail_timeout: Option<u64>,
    backup: bool,
    down: bool,
    max_conns: Option<u32>,
    loc: Loc,
    /// The address as nginx wrote it differs from tidegate's `IP:PORT` text (hostname,
    /// missing port): a consistent-hash ring built from it differs.
    non_canonical: bool,
}

#[derive(Debug, Clone, Default)]
struct StickyCfg {
    name: Option<String>,
    max_age: Option<String>,
    domain: Option<String>,
    path: Option<String>,
    same_site: Option<&'static str>,
    secret: Option<String>,
    loc: Option<Loc>,
}

#[derive(Debug, Clone)]
struct HealthCfg {
    kind: &'static str,
    interval: u64,
    timeout: u64,
    rise: u64,
    fall: u64,
    start_healthy: bool,
    path: Option<String>,
    host: Option<String>,
    expect: Option<Vec<u16>>,
    loc: Loc,
}

#[derive(Debug, Clone)]
struct UpTls {
    verify: bool,
    ca: Option<String>,
    sni: Option<String>,
    loc: Loc,
}

/// One place an upstream is used from (a `proxy_pass`), with the settings in force there.
#[derive(Debug, Clone)]
struct Use {
    loc: Loc,
    ws: bool,
    stream: bool,
    connect: Val<u64>,
    read: Val<u64>,
    send: Val<u64>,
    stream_timeout: Val<u64>,
    tries: Val<u64>,
    next_upstream: Val<Vec<String>>,
    send_proxy: Option<Loc>,
}

#[derive(Debug, Clone)]
struct Up {
    name: String,
    /// The header comment: `upstream chat` or `proxy_pass http://127.0.0.1:9000`.
    label: String,
    loc: Loc,
    stream: bool,
    method: Method,
    method_loc: Option<Loc>,
    sticky: Option<StickyCfg>,
    keepalive: Val<u64>,
    servers: Vec<Srv>,
    health: Option<HealthCfg>,
    /// Why it cannot be written (no usable server, ...).
    dead: Option<String>,
    uses: Vec<Use>,
    tls: Option<UpTls>,
    host_warned: bool,
}

#[derive(Debug, Clone)]
struct ListenSpec {
    addr: SocketAddr,
    ssl: bool,
    default: bool,
    proxy_protocol: bool,
    loc: Loc,
}

#[derive(Debug, Clone)]
struct DraftRoute {
    /// `None`: every path (`location /`).
    prefix: Option<String>,
    exact: bool,
    upstream: usize,
    loc: Loc,
    label: String,
}

#[derive(Debug, Clone)]
struct HttpServer {
    loc: Loc,
    listens: Vec<ListenSpec>,
    names: Vec<(String, Loc)>,
    routes: Vec<DraftRoute>,
    scope: Scope,
    /// A server-level `return`: nginx answers everything itself.
    answers_itself: bool,
}

/// `map $source $target { ... }`.
#[derive(Debug, Clone)]
struct MapDef {
    source: String,
    target: String,
    hostnames: bool,
    default: Option<(String, Loc)>,
    entries: Vec<(String, String, Loc)>,
    loc: Loc,
    stream: bool,
}

#[derive(Debug, Clone)]
struct OutRoute {
    host: Option<String>,
    sni: Option<String>,
    prefix: Option<String>,
    upstream: usize,
    comment: String,
}

#[derive(Debug, Clone)]
struct OutListener {
    /// The first `listen` (for notes).
    loc: Loc,
    name: String,
    bind: String,
    mode: &'static str,
    comment: String,
    /// `mode = "tcp"`.
    upstream: Option<usize>,
    accept_proxy: Option<Loc>,
    trusted: Vec<String>,
    trusted_comment: String,
    keepalive_idle: Val<u64>,
    header_read: Val<u64>,
    body_timeout: Val<u64>,
    send_timeout: Val<u64>,
    underscores: Val<bool>,
    certs: Vec<(String, String, bool, Loc)>,
    min_version: Val<&'static str>,
    no_alpn: bool,
    routes: Vec<OutRoute>,
}

struct Cx {
    prefix: PathBuf,
    main_file: PathBuf,
    notes: Vec<Note>,
    seen_notes: BTreeSet<(PathBuf, usize, Level, String)>,
    skipped: Vec<Skipped>,
    shutdown_timeout: Val<u64>,
    ups: Vec<Up>,
    http_names: BTreeMap<String, usize>,
    stream_names: BTreeMap<String, usize>,
    /// One-server upstreams made from `proxy_pass ADDRESS`, by (stream, address, tls).
    addr_ups: BTreeMap<(bool, String, bool), usize>,
    taken: BTreeSet<String>,
    maps: Vec<MapDef>,
    servers: Vec<HttpServer>,
    listeners: Vec<OutListener>,
}

// =======================================================================================
// Converter: directive classes
// =======================================================================================

/// Directives unrelated to proxying: listed as skipped.
const IRRELEVANT: &[&str] = &[
    "user",
    "worker_processes",
    "worker_rlimit_nofile",
    "worker_cpu_affinity",
    "worker_priority",
    "worker_rlimit_core",
    "worker_connections",
    "worker_aio_requests",
    "pid",
    "error_log",
    "access_log",
    "log_format",
    "log_not_found",
    "log_subrequest",
    "open_log_file_cache",
    "load_module",
    "daemon",
    "master_process",
    "pcre_jit",
    "thread_pool",
    "timer_resolution",
    "env",
    "lock_file",
    "working_directory",
    "debug_points",
    "debug_connection",
    "ssl_engine",
    "use",
    "multi_accept",
    "accept_mutex",
    "accept_mutex_delay",
    "sendfile",
    "sendfile_max_chunk",
    "tcp_nopush",
    "tcp_nodelay",
    "types",
    "types_hash_max_size",
    "types_hash_bucket_size",
    "default_type",
    "charset",
    "charset_types",
    "source_charset",
    "override_charset",
    "server_tokens",
    "server_names_hash_bucket_size",
    "server_names_hash_max_size",
    "variables_hash_max_size",
    "variables_hash_bucket_size",
    "map_hash_bucket_size",
    "map_hash_max_size",
    "proxy_headers_hash_max_size",
    "proxy_headers_hash_bucket_size",
    "aio",
    "aio_write",
    "directio",
    "directio_alignment",
    "output_buffers",
    "postpone_output",
    "read_ahead",
    "send_lowat",
    "reset_timedout_connection",
    "resolver",
    "resolver_timeout",
    "client_body_temp_path",
    "proxy_temp_path",
    "fastcgi_temp_path",
    "uwsgi_temp_path",
    "scgi_temp_path",
    "client_body_buffer_size",
    "client_header_buffer_size",
    "large_client_header_buffers",
    "client_body_in_file_only",
    "client_body_in_single_buffer",
    "etag",
    "if_modified_since",
    "server_name_in_redirect",
    "port_in_redirect",
    "absolute_redirect",
    "msie_padding",
    "msie_refresh",
    "lingering_close",
    "lingering_time",
    "lingering_timeout",
    "keepalive_requests",
    "keepalive_time",
    "keepalive_disable",
    "ignore_invalid_headers",
    "merge_slashes",
    "disable_symlinks",
    "limit_req_zone",
    "limit_conn_zone",
    "limit_req_log_level",
    "limit_conn_log_level",
    "limit_req_status",
    "limit_conn_status",
    "real_ip_recursive",
    "root",
    "alias",
    "index",
    "autoindex",
    "autoindex_exact_size",
    "autoindex_format",
    "autoindex_localtime",
    "uninitialized_variable_warn",
    "proxy_cache_path",
    "fastcgi_cache_path",
    "uwsgi_cache_path",
    "scgi_cache_path",
    "geo",
    "split_clients",
    "variables_hash",
    "stub_status_zone",
    "ssl_session_cache",
    "preread_buffer_size",
    "preread_timeout",
    "proxy_buffer_size",
    "variables",
];

/// Name prefixes of directives unrelated to proxying.
const IRRELEVANT_PREFIXES: &[&str] = &["gzip", "gunzip", "brotli", "zstd", "open_file_cache", "geoip", "quic_", "http3_", "ssl_stapling"];

/// Directives that change what is served or who may be served; tidegate has no equivalent.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("return", "answers requests itself (tidegate only proxies)"),
    ("rewrite", "rewrites URIs (tidegate forwards the path unchanged)"),
    ("try_files", "serves files or switches locations (tidegate only proxies)"),
    ("auth_basic", "access control: tidegate would serve requests nginx refused"),
    ("auth_basic_user_file", "access control: tidegate would serve requests nginx refused"),
    ("auth_request", "access control: tidegate would serve requests nginx refused"),
    ("auth_jwt", "access control: tidegate would serve requests nginx refused"),
    ("allow", "access control: tidegate would serve requests nginx refused"),
    ("deny", "access control: tidegate would serve requests nginx refused"),
    ("satisfy", "access control: tidegate would serve requests nginx refused"),
    ("internal", "makes a location reachable only internally"),
    ("ssl_verify_client", "client certificate authentication: tidegate would serve clients nginx refused"),
    ("ssl_client_certificate", "client certificate authentication: tidegate would serve clients nginx refused"),
    ("proxy_ssl_certificate", "client certificates towards the servers are not supported"),
    ("proxy_ssl_certificate_key", "client certificates towards the servers are not supported"),
    ("fastcgi_pass", "FastCGI backends are not supported (tidegate proxies HTTP)"),
    ("uwsgi_pass", "uwsgi backends are not supported (tidegate proxies HTTP)"),
    ("scgi_pass", "SCGI backends are not supported (tidegate proxies HTTP)"),
    ("grpc_pass", "gRPC proxying (HTTP/2) is not supported"),
    ("memcached_pass", "memcached backends are not supported"),
    ("stub_status", "answers status requests itself"),
    ("empty_gif", "answers requests itself"),
    ("mirror", "request mirroring is not supported"),
    ("js_content", "njs content handlers are not supported"),
    ("perl", "perl content handlers are not supported"),
    ("secure_link", "secure links are not supported"),
    ("limit_except", "method-based access control: tidegate would serve requests nginx refused"),
    ("ssl_reject_handshake", "refuses TLS handshakes for unknown names; tidegate serves its default certificate instead"),
];

/// Proxy settings without an equivalent that do not change where a request goes.
const WARN: &[(&str, &str)] = &[
    ("proxy_buffers", "tidegate streams bodies; buffering is not configurable"),
    ("proxy_busy_buffers_size", "tidegate streams bodies; buffering is not configurable"),
    ("proxy_max_temp_file_size", "tidegate streams bodies; buffering is not configurable"),
    ("proxy_temp_file_write_size", "tidegate streams bodies; buffering is not configurable"),
    ("proxy_redirect", "tidegate does not rewrite Location headers"),
    ("proxy_cookie_domain", "tidegate does not rewrite Set-Cookie headers"),
    ("proxy_cookie_path", "tidegate does not rewrite Set-Cookie headers"),
    ("proxy_cookie_flags", "tidegate does not rewrite Set-Cookie headers"),
    ("proxy_hide_header", "tidegate passes response headers unchanged (hop-by-hop ones removed)"),
    ("proxy_pass_header", "tidegate passes response headers unchanged (hop-by-hop ones removed)"),
    ("proxy_ignore_headers", "tidegate has no cache; nothing to ignore"),
    ("proxy_intercept_errors", "tidegate passes error responses through"),
    ("proxy_set_body", "tidegate forwards the request body unchanged"),
    ("proxy_pass_request_headers", "tidegate always forwards request headers"),
    ("proxy_pass_request_body", "tidegate always forwards the request body"),
    ("proxy_next_upstream_timeout", "tidegate bounds retries by tries and the connect timeout"),
    ("proxy_socket_keepalive", "not configurable"),
    ("proxy_bind", "tidegate connects from the system's default source address"),
    ("proxy_method", "tidegate forwards the client's method"),
    ("proxy_ignore_client_abort", "tidegate cancels the upstream request when the client goes away"),
    ("proxy_limit_rate", "no rate limiting"),
    ("proxy_store", "tidegate does not store responses"),
    ("proxy_store_access", "tidegate does not store responses"),
    ("proxy_force_ranges", "not configurable"),
    ("proxy_no_cache", "tidegate has no cache"),
    ("proxy_ssl_protocols", "tidegate uses rustls's safe defaults (TLS 1.2 and 1.3) towards servers"),
    ("proxy_ssl_ciphers", "tidegate uses rustls's safe defaults towards servers"),
    ("proxy_ssl_session_reuse", "not configurable"),
    ("proxy_ssl_verify_depth", "not configurable"),
    ("proxy_ssl_crl", "CRLs are not supported"),
    ("proxy_ssl_conf_command", "not configurable"),
    ("proxy_download_rate", "no rate limiting"),
    ("proxy_upload_rate", "no rate limiting"),
    ("proxy_responses", "tidegate proxies TCP only"),
    ("proxy_half_close", "not configurable"),
    ("error_page", "tidegate passes the servers' error responses through and answers its own errors (502, 503, 504) plainly"),
    ("add_header", "tidegate does not add response headers"),
    ("add_trailer", "tidegate does not add trailers"),
    ("more_set_headers", "tidegate does not add headers"),
    ("more_clear_headers", "tidegate does not remove headers"),
    ("more_set_input_headers", "tidegate does not add request headers"),
    ("client_max_body_size", "tidegate does not limit request bodies (they are streamed)"),
    ("expires", "tidegate does not add Expires/Cache-Control headers"),
    ("chunked_transfer_encoding", "not configurable"),
    ("limit_req", "no request rate limiting"),
    ("limit_conn", "no connection limiting per key (max_conns limits per server)"),
    ("limit_rate", "no rate limiting"),
    ("limit_rate_after", "no rate limiting"),
    ("sub_filter", "tidegate does not rewrite response bodies"),
    ("sub_filter_once", "tidegate does not rewrite response bodies"),
    ("sub_filter_types", "tidegate does not rewrite response bodies"),
    ("set", "variables do not exist in tidegate"),
    ("recursive_error_pages", "no error pages"),
    ("max_ranges", "not configurable"),
    ("ssl_ciphers", "tidegate uses rustls's cipher suites"),
    ("ssl_prefer_server_ciphers", "tidegate uses rustls's cipher suites"),
    ("ssl_session_timeout", "session resumption is on with rustls's defaults"),
    ("ssl_session_tickets", "session resumption is on with rustls's defaults"),
    ("ssl_session_ticket_key", "session tickets use keys rotated by tidegate"),
    ("ssl_dhparam", "rustls has no finite-field Diffie-Hellman"),
    ("ssl_ecdh_curve", "rustls chooses key-exchange groups"),
    ("ssl_buffer_size", "not configurable"),
    ("ssl_trusted_certificate", "OCSP stapling is not supported"),
    ("ssl_early_data", "0-RTT is off"),
    ("ssl_conf_command", "not configurable"),
    ("ssl_password_file", "encrypted keys are not supported: decrypt the key file"),
    ("ssl_handshake_timeout", "tidegate's handshake_timeout (default 10s) applies"),
    ("http2", "tidegate speaks HTTP/1.1 to clients (ALPN http/1.1); HTTP/2 clients fall back"),
    ("http2_push", "HTTP/2 is not supported"),
    ("http2_push_preload", "HTTP/2 is not supported"),
    ("http2_max_concurrent_streams", "HTTP/2 is not supported"),
    ("http2_max_field_size", "HTTP/2 is not supported"),
    ("http2_max_header_size", "HTTP/2 is not supported"),
    ("http2_recv_buffer_size", "HTTP/2 is not supported"),
    ("http2_body_preread_size", "HTTP/2 is not supported"),
    ("http2_idle_timeout", "HTTP/2 is not supported"),
    ("http3", "HTTP/3 is not supported"),
    ("proxy_protocol_timeout", "the PROXY header must arrive within the listener's header_read timeout"),
    ("ssi", "server-side includes are not supported"),
    ("sub_filter_last_modified", "tidegate does not rewrite response bodies"),
    ("proxy_cache", "tidegate has no cache"),
    ("proxy_cache_key", "tidegate has no cache"),
    ("proxy_cache_valid", "tidegate has no cache"),
    ("proxy_cache_bypass", "tidegate has no cache"),
    ("proxy_cache_use_stale", "tidegate has no cache"),
    ("proxy_cache_lock", "tidegate has no cache"),
    ("proxy_cache_methods", "tidegate has no cache"),
    ("proxy_cache_min_uses", "tidegate has no cache"),
    ("proxy_cache_revalidate", "tidegate has no cache"),
    ("proxy_cache_background_update", "tidegate has no cache"),
];

/// Directives that make a location serve content (or hand it to a non-HTTP backend).
const CONTENT: &[&str] = &[
    "return",
    "try_files",
    "root",
    "alias",
    "index",
    "autoindex",
    "stub_status",
    "empty_gif",
    "fastcgi_pass",
    "uwsgi_pass",
    "scgi_pass",
    "grpc_pass",
    "memcached_pass",
    "js_content",
    "perl",
];

fn is_irrelevant(name: &str) -> bool {
    IRRELEVANT.contains(&name) || IRRELEVANT_PREFIXES.iter().any(|p| name.starts_with(p))
}

// =======================================================================================
// Converter: walking the tree
// =======================================================================================

impl Cx {
    fn new(prefix: PathBuf, main_file: PathBuf) -> Self {
        Cx {
            prefix,
            main_file,
            notes: Vec::new(),
            seen_notes: BTreeSet::new(),
            skipped: Vec::new(),
            shutdown_timeout: None,
            ups: Vec::new(),
            http_names: BTreeMap::new(),
            stream_names: BTreeMap::new(),
            addr_ups: BTreeMap::new(),
            taken: BTreeSet::new(),
            maps: Vec::new(),
            servers: Vec::new(),
            listeners: Vec::new(),
        }
    }

    /// `path` as shown in notes and comments: relative to the main file's directory.
    fn shown(&self, path: &Path) -> PathBuf {
        match path.strip_prefix(&self.prefix) {
            Ok(rel) if !rel.as_os_str().is_empty() => rel.to_path_buf(),
            _ => path.to_path_buf(),
        }
    }

    fn at(&self, loc: &Loc) -> String {
        format!("{}:{}", self.shown(&loc.file).display(), loc.line)
    }

    fn note(&mut self, loc: &Loc, level: Level, message: impl Into<String>) {
        let message: String = message.into().replace(['\n', '\r'], " ");
        let file = self.shown(&loc.file);
        if self.seen_notes.insert((file.clone(), loc.line, level, message.clone())) {
            self.notes.push(Note { file, line: loc.line, level, message });
        }
    }

    fn converted(&mut self, d: &Directive, message: impl Into<String>) {
        self.note(&d.loc(), Level::Converted, message);
    }

    fn warn(&mut self, d: &Directive, message: impl Into<String>) {
        self.note(&d.loc(), Level::Warning, message);
    }

    fn unsupported(&mut self, d: &Directive, message: impl Into<String>) {
        self.note(&d.loc(), Level::Unsupported, message);
    }

    fn skip(&mut self, d: &Directive) {
        self.skipped.push(Skipped { file: self.shown(&d.file), line: d.line, directive: d.name.clone() });
    }

    /// A directive no walker handles: skipped, warned about or unsupported by its class.
    fn other(&mut self, d: &Directive, ctx: Ctx) {
        let n = d.name.as_str();
        if ctx == (Ctx::Location { proxies: false }) && (CONTENT.contains(&n) || n.contains("_by_lua")) {
            return; // covered by the location's own note
        }
        if is_irrelevant(n) {
            self.skip(d);
        } else if n.contains("_by_lua") || n.starts_with("lua_") {
            if n.starts_with("lua_") || n.starts_with("init") || n.starts_with("log_by") || n.starts_with("header_filter") {
                self.warn(d, format!("{}: Lua is not supported; not carried over", d.text()));
            } else {
                self.unsupported(d, format!("{}: Lua handlers are not supported; they may change routing or answer requests", d.text()));
            }
        } else if let Some((_, why)) = UNSUPPORTED.iter().find(|(k, _)| *k == n) {
            self.unsupported(d, format!("{}: not converted: {why}", d.text()));
        } else if let Some((_, why)) = WARN.iter().find(|(k, _)| *k == n) {
            self.warn(d, format!("{}: not carried over: {why}", d.text()));
        } else if n.starts_with("proxy_cache") || n.starts_with("fastcgi_") || n.starts_with("uwsgi_") || n.starts_with("scgi_") {
            self.warn(d, format!("{}: not carried over: tidegate has no cache and proxies HTTP only", d.text()));
        } else if n.starts_with("ssl_") || n.starts_with("proxy_ssl_") {
            self.warn(d, format!("{}: not carried over: TLS tuning uses rustls's defaults", d.text()));
        } else if n.starts_with("proxy_") {
            self.warn(d, format!("{}: not carried over: no equivalent setting", d.text()));
        } else if ctx == Ctx::Upstream {
            self.unsupported(d, format!("{}: unknown directive in an upstream block (a third-party balancer?); not converted", d.text()));
        } else {
            self.warn(d, format!("{}: unknown directive (a third-party module?); not carried over", d.text()));
        }
    }

    fn main(&mut self, tree: &[Directive]) {
        for d in tree {
            match d.name.as_str() {
                "http" if d.block.is_some() => self.http(d),
                "stream" if d.block.is_some() => self.stream(d),
                "events" => self.skip(d),
                "mail" => self.warn(d, "mail proxying is not supported; the mail block is skipped"),
                "worker_shutdown_timeout" => match d.arg(0).and_then(nginx_time_ms).filter(|&ms| ms > 0) {
                    Some(ms) => {
                        self.shutdown_timeout = Some((ms, d.loc()));
                        self.converted(d, "-> shutdown_timeout");
                    }
                    None => self.warn(d, format!("{}: cannot read the time; not carried over", d.text())),
                },
                _ => self.other(d, Ctx::Main),
            }
        }
        self.build_http_listeners();
    }

    fn http(&mut self, d: &Directive) {
        let block = d.children();
        let scope = self.scope(block, &Scope::default(), Ctx::Http);
        for c in block {
            match c.name.as_str() {
                "map" => self.map(c, false),
                "upstream" => self.upstream(c, false),
                _ => {}
            }
        }
        for c in block.iter().filter(|c| c.name == "server") {
            self.http_server(c, &scope);
        }
    }

    fn stream(&mut self, d: &Directive) {
        let block = d.children();
        let scope = self.scope(block, &Scope::default(), Ctx::Stream);
        for c in block {
            match c.name.as_str() {
                "map" => self.map(c, true),
                "upstream" => self.upstream(c, true),
                _ => {}
            }
        }
        for c in block.iter().filter(|c| c.name == "server") {
            self.stream_server(c, &scope);
        }
    }

    /// Reads a block's settings on top of the inherited `parent`, and classifies every
    /// directive no walker handles.
    fn scope(&mut self, block: &[Directive], parent: &Scope, ctx: Ctx) -> Scope {
        let mut s = parent.clone();
        let (mut headers, mut certs, mut keys, mut real_ip) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let stream = matches!(ctx, Ctx::Stream | Ctx::StreamServer);
        for d in block {
            let n = d.name.as_str();
            let time = |d: &Directive| d.arg(0).and_then(nginx_time_ms).map(|ms| (ms, d.loc()));
            match n {
                // Handled by the walkers.
                "upstream" | "server" | "map" | "location" | "if" | "listen" | "server_name" | "proxy_pass" | "include"
                | "health_check" => {}
                "http" | "stream" | "events" | "mail" if ctx == Ctx::Main => {}
                "proxy_connect_timeout"
                | "proxy_read_timeout"
                | "proxy_send_timeout"
                | "proxy_timeout"
                | "keepalive_timeout"
                | "client_header_timeout"
                | "client_body_timeout"
                | "send_timeout" => {
                    let Some(v) = time(d) else {
                        self.warn(d, format!("{}: cannot read the time; not carried over", d.text()));
                        continue;
                    };
                    match n {
                        "proxy_connect_timeout" => s.connect = Some(v),
                        "proxy_read_timeout" => s.read = Some(v),
                        "proxy_send_timeout" => s.send = Some(v),
                        "proxy_timeout" => s.stream_timeout = Some(v),
                        "keepalive_timeout" => s.keepalive_timeout = Some(v),
                        "client_body_timeout" => s.body_timeout = Some(v),
                        "send_timeout" => s.send_timeout = Some(v),
                        _ => s.header_timeout = Some(v),
                    }
                }
                "underscores_in_headers" => s.underscores = Some((d.arg(0) == Some("on"), d.loc())),
                "proxy_next_upstream_tries" => match d.arg(0).and_then(|a| a.parse::<u64>().ok()) {
                    Some(t) => s.tries = Some((t, d.loc())),
                    None => self.warn(d, format!("{}: not a number; not carried over", d.text())),
                },
                "proxy_next_upstream" => {
                    s.next_upstream = Some((d.args.iter().map(|a| a.value.clone()).collect(), d.loc()));
                }
                "proxy_set_header" => match (d.arg(0), d.arg(1)) {
                    (Some(name), Some(value)) if d.args.len() == 2 => {
                        headers.push(Header { name: name.to_ascii_lowercase(), value: value.to_string(), loc: d.loc() })
                    }
                    _ => self.warn(d, format!("{}: expected a header name and a value; not carried over", d.text())),
                },
                "proxy_http_version" => {
                    self.converted(d, "tidegate always speaks HTTP/1.1 to servers (keep-alive, WebSocket upgrades); nothing to emit")
                }
                "proxy_buffering" | "proxy_request_buffering" => {
                    self.converted(d, "tidegate always streams request and response bodies; nothing to emit")
                }
                "ssl_certificate" | "ssl_certificate_key" => match d.arg(0) {
                    Some(p) if d.args.len() == 1 => {
                        if n == "ssl_certificate" {
                            certs.push((p.to_string(), d.loc()));
                        } else {
                            keys.push((p.to_string(), d.loc()));
                        }
                    }
                    _ => self.warn(d, format!("{}: expected one path", d.text())),
                },
                "ssl_protocols" => s.protocols = Some((d.args.iter().map(|a| a.value.clone()).collect(), d.loc())),
                "ssl" => s.ssl_on = d.arg(0) == Some("on"),
                "set_real_ip_from" => match d.arg(0) {
                    Some(v) => real_ip.push((v.to_string(), d.loc())),
                    None => self.warn(d, "set_real_ip_from without an address"),
                },
                "real_ip_header" => {
                    if let Some(v) = d.arg(0) {
                        s.real_ip_header = Some((v.to_string(), d.loc()));
                    }
                }
                "proxy_ssl_verify" => s.ssl_verify = Some((d.arg(0) == Some("on"), d.loc())),
                "proxy_ssl_trusted_certificate" => {
                    if let Some(v) = d.arg(0) {
                        s.ssl_trusted = Some((v.to_string(), d.loc()));
                    }
                }
                "proxy_ssl_name" => {
                    if let Some(v) = d.arg(0) {
                        s.ssl_name = Some((v.to_string(), d.loc()));
                    }
                }
                "proxy_ssl_server_name" => s.ssl_server_name = d.arg(0) == Some("on"),
                "proxy_protocol" if stream => {
                    if d.arg(0) == Some("on") {
                        s.send_proxy = Some(d.loc());
                        self.converted(d, "-> send_proxy = \"v1\" on the upstream (nginx sends PROXY protocol v1)");
                    } else {
                        s.send_proxy = None;
                    }
                }
                "ssl_preread" if stream => s.ssl_preread = d.arg(0) == Some("on"),
                "proxy_ssl" if stream => {
                    s.proxy_ssl = if d.arg(0) == Some("on") { Some(d.loc()) } else { None };
                }
                _ => self.other(d, ctx),
            }
        }
        if !headers.is_empty() {
            s.headers = headers;
        }
        if !certs.is_empty() || !keys.is_empty() {
            s.certs = certs;
            s.keys = keys;
        }
        if !real_ip.is_empty() {
            s.real_ip_from = real_ip;
        }
        s
    }

    /// `map $source $target { ... }`: kept for `proxy_pass $target` (stream SNI routing) and
    /// for recognising the WebSocket `$connection_upgrade` idiom.
    fn map(&mut self, d: &Directive, stream: bool) {
        let (Some(source), Some(target)) = (d.arg(0).and_then(single_var), d.arg(1).and_then(single_var)) else {
            self.skip(d);
            return;
        };
        let mut m = MapDef { source, target, hostnames: false, default: None, entries: Vec::new(), loc: d.loc(), stream };
        for e in d.children() {
            match (e.name.as_str(), e.arg(0)) {
                ("hostnames", None) => m.hostnames = true,
                ("volatile", None) => {}
                ("default", Some(v)) => m.default = Some((v.to_string(), e.loc())),
                (key, Some(v)) => m.entries.push((key.to_string(), v.to_string(), e.loc())),
                _ => {}
            }
        }
        self.maps.push(m);
    }

    fn map_for(&self, var: &str, stream: bool) -> Option<&MapDef> {
        self.maps.iter().rev().find(|m| m.target == var && m.stream == stream)
    }

    /// A tidegate upstream name for nginx name `want`: unique, valid characters.
    fn claim_name(&mut self, want: &str) -> String {
        let mut base: String =
            want.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') { c } else { '_' }).collect();
        if base.is_empty() {
            base = "upstream".into();
        }
        let mut name = base.clone();
        let mut n = 2;
        while self.taken.contains(&name) {
            name = format!("{base}-{n}");
            n += 1;
        }
        self.taken.insert(name.clone());
        name
    }

    fn new_up(&mut self, name: String, label: String, loc: Loc, stream: bool) -> usize {
        self.ups.push(Up {
            name,
            label,
            loc,
            stream,
            method: Method::RoundRobin,
            method_loc: None,
            sticky: None,
            keepalive: None,
            servers: Vec::new(),
            health: None,
            dead: None,
            uses: Vec::new(),
            tls: None,
            host_warned: false,
        });
        self.ups.len() - 1
    }
}

// =======================================================================================
// Converter: upstream blocks
// =======================================================================================

impl Cx {
    fn upstream(&mut self, d: &Directive, stream: bool) {
        let Some(nginx_name) = d.arg(0).filter(|_| d.args.len() == 1) else {
            self.unsupported(d, format!("{}: expected `upstream NAME {{ ... }}`; not converted", d.text()));
            return;
        };
        let names = if stream { &self.stream_names } else { &self.http_names };
        if names.contains_key(nginx_name) {
            self.unsupported(d, format!("duplicate upstream \"{nginx_name}\" (nginx refuses this); the first one is used"));
            return;
        }
        let name = self.claim_name(nginx_name);
        if name != nginx_name {
            self.warn(d, format!("upstream \"{nginx_name}\" is named \"{name}\" in tidegate (names are unique across http and stream, letters, digits, '_', '.', '-')"));
        }
        let i = self.new_up(name, format!("upstream {nginx_name}"), d.loc(), stream);
        if stream {
            self.stream_names.insert(nginx_name.to_string(), i);
        } else {
            self.http_names.insert(nginx_name.to_string(), i);
        }
        let mut check: Option<&Directive> = None;
        let mut check_send: Option<&Directive> = None;
        let mut check_expect: Option<&Directive> = None;
        let mut sticky: Option<&Directive> = None;
        for c in d.children() {
            match c.name.as_str() {
                "server" => self.upstream_server(c, i),
                "least_conn" => self.set_method(i, c, Method::LeastConn, "-> balance = \"least_conn\""),
                "ip_hash" => self.set_method(
                    i,
                    c,
                    Method::IpHash,
                    "-> balance = \"ip_hash\" with ip_hash = { mode = \"nginx\" }: nginx's own hash of the first three octets, so clients keep their server",
                ),
                "hash" => self.hash_method(i, c),
                "random" => self.random_method(i, c),
                "least_time" => {
                    self.set_method(i, c, Method::LeastConn, "");
                    self.warn(c, format!("{}: nginx Plus's least_time becomes least_conn (tidegate does not measure response times)", c.text()));
                }
                "sticky" => sticky = Some(c),
                "keepalive" => match c.arg(0).and_then(|a| a.parse::<u64>().ok()) {
                    Some(k) => {
                        self.ups[i].keepalive = Some((k, c.loc()));
                        self.converted(c, "-> keepalive (tidegate counts idle connections per server; nginx per worker for the whole upstream)");
                    }
                    None => self.warn(c, format!("{}: not a number; not carried over", c.text())),
                },
                "zone" => self.converted(c, "ignored: tidegate's balancing state is shared by all its threads without a zone"),
                "keepalive_timeout" | "keepalive_requests" | "keepalive_time" => {
                    self.warn(c, format!("{}: not configurable in tidegate; idle pooled connections are kept until the server closes them", c.text()))
                }
                "resolver" | "resolver_timeout" => {
                    self.warn(c, format!("{}: tidegate resolves server names once, when it loads the config", c.text()))
                }
                "queue" => self.warn(c, format!("{}: tidegate does not queue; when every server is full it answers 503 at once", c.text())),
                "ntlm" => self.unsupported(c, format!("{}: NTLM connection binding is not supported", c.text())),
                "state" => self.unsupported(c, format!("{}: servers kept in a state file are not read; list them in the upstream", c.text())),
                "check" => check = Some(c),
                "check_http_send" => check_send = Some(c),
                "check_http_expect_alive" => check_expect = Some(c),
                "check_keepalive_requests" | "check_shm_size" | "check_fastcgi_param" => {
                    self.warn(c, format!("{}: not configurable in tidegate's health checks", c.text()))
                }
                _ => self.other(c, Ctx::Upstream),
            }
        }
        if let Some(c) = check {
            self.health_check(i, c, check_send, check_expect);
        } else {
            for c in [check_send, check_expect].into_iter().flatten() {
                self.warn(c, format!("{}: without a `check` directive there is no health check to apply it to", c.text()));
            }
        }
        if let Some(s) = sticky {
            self.sticky(i, s);
        }
        self.finish_upstream(i, d);
    }

    fn set_method(&mut self, i: usize, d: &Directive, m: Method, message: &str) {
        if let Some(prev) = &self.ups[i].method_loc {
            let at = self.at(prev);
            self.warn(d, format!("load balancing method redefined (previously at {at}); the last one wins, as in nginx"));
        }
        self.ups[i].method = m;
        self.ups[i].method_loc = Some(d.loc());
        if !message.is_empty() {
            self.converted(d, message);
        }
    }

    fn hash_method(&mut self, i: usize, d: &Directive) {
        let consistent = match d.arg(1) {
            None => false,
            Some("consistent") if d.args.len() == 2 => true,
            _ => {
                self.unsupported(d, format!("{}: expected `hash KEY [consistent]`; balanced round-robin instead", d.text()));
                return;
            }
        };
        let raw = d.arg(0).unwrap_or_default();
        let stream = self.ups[i].stream;
        match hash_key(raw, stream) {
            Ok((key, caveat)) => {
                let mut msg = format!("-> balance = \"hash\", key = \"{key}\", bounded_load = 0");
                if consistent {
                    msg.push_str(" (the same ketama ring as nginx's `hash ... consistent`)");
                }
                self.set_method(i, d, Method::Hash { key, consistent }, &msg);
                if !consistent {
                    self.warn(
                        d,
                        "nginx's `hash` without `consistent` maps keys by a weighted modulo; tidegate hashes consistently (ketama ring), so most keys move to another server once after the switch, and afterwards adding or removing a server moves only ~1/N of them",
                    );
                }
                if let Some(c) = caveat {
                    self.warn(d, c);
                }
            }
            Err(why) => self.unsupported(d, format!("{}: {why}; balanced round-robin instead", d.text())),
        }
    }

    fn random_method(&mut self, i: usize, d: &Directive) {
        match (d.arg(0), d.arg(1)) {
            (None, _) => {
                self.set_method(i, d, Method::Random, "");
                self.warn(
                    d,
                    "`random` becomes round_robin: the same share per server as nginx's weighted random, without the load-awareness p2c would add (use balance = \"p2c\" for nginx's `random two`)",
                );
            }
            (Some("two"), None | Some("least_conn")) if d.args.len() <= 2 => {
                self.set_method(i, d, Method::RandomTwo, "-> balance = \"p2c\": two weighted-random servers, the less loaded wins")
            }
            (Some("two"), Some(m)) => {
                self.set_method(i, d, Method::RandomTwo, "");
                self.warn(d, format!("`random two {m}` becomes p2c comparing live connections (tidegate does not measure response times)"));
            }
            _ => self.unsupported(d, format!("{}: expected `random [two [least_conn]]`; balanced round-robin instead", d.text())),
        }
    }

    fn upstream_server(&mut self, d: &Directive, i: usize) {
        let Some(raw) = d.arg(0) else {
            self.unsupported(d, "server without an address; not converted");
            return;
        };
        let stream = self.ups[i].stream;
        if raw.get(..5).is_some_and(|p| p.eq_ignore_ascii_case("unix:")) {
            self.unsupported(
                d,
                format!("{}: unix-socket servers are not supported (tidegate connects over TCP); server left out", d.text()),
            );
            return;
        }
        let (addr, non_canonical) = match server_addr(raw, if stream { None } else { Some(80) }) {
            Ok(a) => a,
            Err(why) => {
                self.unsupported(d, format!("{}: {why}; server left out", d.text()));
                return;
            }
        };
        let mut s = Srv {
            addr,
            weight: 1,
            max_fails: None,
            fail_timeout: None,
            backup: false,
            down: false,
            max_conns: None,
            loc: d.loc(),
            non_canonical,
        };
        if !non_canonical {
            // nothing to say
        } else if raw.parse::<IpAddr>().is_ok() || raw.trim_start_matches('[').trim_end_matches(']').parse::<Ipv6Addr>().is_ok() {
            self.converted(d, format!("\"{raw}\" has no port: {} (nginx's default port 80)", s.addr));
        } else {
            self.warn(
                d,
                format!("\"{raw}\" is a host name: tidegate resolves it once when it loads the config and uses the first address (nginx adds one server per address)"),
            );
        }
        for a in d.args.iter().skip(1) {
            let p = a.value.as_str();
            let (key, val) = p.split_once('=').unwrap_or((p, ""));
            match key {
                "weight" => match val.parse::<u32>() {
                    Ok(w) if w >= 1 => s.weight = w,
                    _ => self.unsupported(d, format!("invalid weight \"{val}\"; weight 1 used")),
                },
                "max_fails" => match val.parse::<u32>() {
                    Ok(m) => s.max_fails = Some(m),
                    _ => self.warn(d, format!("invalid max_fails \"{val}\"; the default (1) applies")),
                },
                "fail_timeout" => match nginx_time_ms(val) {
                    Some(0) => {
                        s.fail_timeout = Some(1000);
                        self.warn(d, "fail_timeout=0 becomes \"1s\" (tidegate's smallest useful window)");
                    }
                    Some(ms) => s.fail_timeout = Some(ms),
                    None => self.warn(d, format!("invalid fail_timeout \"{val}\"; the default (10s) applies")),
                },
                "max_conns" => match val.parse::<u32>() {
                    Ok(m) => s.max_conns = Some(m),
                    _ => self.warn(d, format!("invalid max_conns \"{val}\"; not carried over")),
                },
                "backup" if val.is_empty() => s.backup = true,
                "down" if val.is_empty() => s.down = true,
                "drain" if val.is_empty() => {
                    s.down = true;
                    self.warn(
                        d,
                        "`drain` becomes down = true, tidegate's way to drain: the server gets no new connections and its open WebSocket tunnels run on for drain_timeout (10m), then close with 1001 spread over drain_spread; unlike nginx Plus, requests bound to it by a sticky cookie are rebalanced at once",
                    );
                }
                "route" => self.warn(d, format!("route={val} ignored: tidegate's sticky cookies carry their own opaque server id")),
                "slow_start" => self.warn(d, format!("slow_start={val} not supported: a recovered server takes its full share at once (least_conn and p2c fill an empty server first)")),
                "resolve" if val.is_empty() => self.warn(d, "`resolve` not supported: tidegate resolves the name once when the config loads (reload to re-resolve)"),
                "service" => self.warn(d, format!("service={val} (DNS SRV lookup) not supported: the name is resolved as an ordinary A/AAAA record on port {}", s.addr.rsplit(':').next().unwrap_or("80"))),
                "id" | "sid" => self.warn(d, format!("{p} ignored")),
                _ => self.unsupported(d, format!("unknown server parameter \"{p}\"; ignored")),
            }
        }
        let up = &mut self.ups[i];
        if let Some(prev) = up.servers.iter_mut().find(|o| o.addr == s.addr) {
            prev.weight = prev.weight.saturating_add(s.weight);
            let (addr, w) = (prev.addr.clone(), prev.weight);
            self.warn(d, format!("server {addr} is listed twice; tidegate needs it once: merged with weight {w}"));
            return;
        }
        up.servers.push(s);
    }

    fn finish_upstream(&mut self, i: usize, d: &Directive) {
        let up = &self.ups[i];
        let method = up.method.clone();
        let any_backup = up.servers.iter().any(|s| s.backup);
        let hash_like = matches!(method, Method::IpHash | Method::Hash { .. } | Method::Random | Method::RandomTwo);
        if any_backup && hash_like {
            self.warn(d, "nginx refuses `backup` servers with hash, ip_hash and random balancing; tidegate keeps them as backups (used only when no primary can serve)");
        }
        if matches!(method, Method::Hash { consistent: true, .. }) {
            let odd: Vec<String> = self.ups[i].servers.iter().filter(|s| s.non_canonical).map(|s| s.addr.clone()).collect();
            if !odd.is_empty() {
                self.warn(
                    d,
                    format!(
                        "nginx builds its consistent-hash ring from the server addresses as written; tidegate from the resolved IP:PORT text, so keys on {} will map differently (write servers as IP:PORT to keep the mapping)",
                        odd.join(", ")
                    ),
                );
            }
        }
        let up = &mut self.ups[i];
        if up.servers.is_empty() {
            up.dead = Some("it has no server tidegate can use".into());
        } else if up.servers.iter().all(|s| s.down) {
            up.dead = Some("every server is down (tidegate needs at least one up)".into());
        } else if up.servers.iter().all(|s| s.backup) {
            up.dead = Some("every server is a backup (tidegate needs a primary)".into());
        }
        if let Some(why) = self.ups[i].dead.clone() {
            let name = self.ups[i].name.clone();
            self.unsupported(d, format!("upstream \"{name}\" is not written: {why}; locations using it are left out"));
        }
    }

    /// `check interval=3000 rise=2 fall=5 timeout=1000 type=http` (nginx_upstream_check_module).
    fn health_check(&mut self, i: usize, c: &Directive, send: Option<&Directive>, expect: Option<&Directive>) {
        let mut h = HealthCfg {
            kind: "tcp",
            interval: 30_000,
            timeout: 1000,
            rise: 2,
            fall: 5,
            start_healthy: false,
            path: None,
            host: None,
            expect: None,
            loc: c.loc(),
        };
        let mut kind = "tcp".to_string();
        for a in &c.args {
            let (k, v) = a.value.split_once('=').unwrap_or((a.value.as_str(), ""));
            let num = v.parse::<u64>().ok();
            match (k, num) {
                ("interval", Some(n)) if n > 0 => h.interval = n,
                ("timeout", Some(n)) if n > 0 => h.timeout = n,
                ("rise", Some(n)) if (1..=1000).contains(&n) => h.rise = n,
                ("fall", Some(n)) if (1..=1000).contains(&n) => h.fall = n,
                ("type", _) => kind = v.to_string(),
                ("default_down", _) => h.start_healthy = v == "false",
                ("port", Some(0)) => {}
                ("port", _) => self.warn(c, format!("check port={v} not supported: tidegate checks each server on its own port")),
                _ => self.warn(c, format!("check parameter \"{}\" not understood; ignored", a.value)),
            }
        }
        h.kind = match kind.as_str() {
            "http" => "http",
            "tcp" => "tcp",
            other => {
                self.warn(c, format!("check type={other} becomes a tcp (connect-only) check"));
                "tcp"
            }
        };
        if h.kind == "http" {
            let request = send.and_then(|s| s.arg(0)).unwrap_or("GET / HTTP/1.0\r\n\r\n");
            let mut lines = request.split("\r\n").flat_map(|l| l.split('\n'));
            let first = lines.next().unwrap_or_default();
            let mut words = first.split_whitespace();
            let method = words.next().unwrap_or("GET");
            let path = words.next().unwrap_or("/");
            if method != "GET"
                && let Some(s) = send
            {
                self.warn(s, format!("tidegate's http check sends GET, not {method}"));
            }
            if path.starts_with('/') && !path.bytes().any(|b| b.is_ascii_control()) {
                h.path = Some(path.to_string());
            } else if let Some(s) = send {
                self.warn(s, format!("check path \"{path}\" not usable; \"/\" is checked"));
            }
            for l in lines {
                if let Some((k, v)) = l.split_once(':')
                    && k.trim().eq_ignore_ascii_case("host")
                    && !v.trim().is_empty()
                    && !v.trim().contains(|c: char| c.is_whitespace() || c.is_control())
                {
                    h.host = Some(v.trim().to_string());
                }
            }
            let classes: Vec<String> = match expect {
                Some(e) => e.args.iter().map(|a| a.value.clone()).collect(),
                None => vec!["http_2xx".into(), "http_3xx".into()],
            };
            let mut codes: Vec<u16> = Vec::new();
            let mut only_2xx = true;
            for cls in &classes {
                let class: &[u16] = match cls.as_str() {
                    "http_1xx" => &STATUS_1XX,
                    "http_2xx" => &STATUS_2XX,
                    "http_3xx" => &STATUS_3XX,
                    "http_4xx" => &STATUS_4XX,
                    "http_5xx" => &STATUS_5XX,
                    other => {
                        if let Some(e) = expect {
                            self.warn(e, format!("expected status class \"{other}\" not understood; ignored"));
                        }
                        continue;
                    }
                };
                only_2xx &= cls == "http_2xx";
                codes.extend_from_slice(class);
            }
            codes.sort_unstable();
            codes.dedup();
            h.expect = if only_2xx || codes.is_empty() { None } else { Some(codes) };
        } else {
            for s in [send, expect].into_iter().flatten() {
                self.warn(s, format!("{}: only used by type=http checks", s.text()));
            }
        }
        if h.timeout > h.interval {
            self.warn(
                c,
                format!(
                    "check timeout ({}ms) exceeds the interval ({}ms); tidegate's timeout must not, so it is set to the interval",
                    h.timeout, h.interval
                ),
            );
            h.timeout = h.interval;
        }
        self.converted(c, "-> [health] (nginx_upstream_check_module)");
        self.ups[i].health = Some(h);
    }

    /// nginx Plus's `health_check [interval=5] [fails=1] [passes=1] [uri=/]` in a location.
    fn plus_health_check(&mut self, i: usize, c: &Directive) {
        if self.ups[i].health.is_some() {
            self.warn(c, "the upstream already has a health check; this one is not used");
            return;
        }
        let mut h = HealthCfg {
            kind: "http",
            interval: 5000,
            timeout: 1000,
            rise: 1,
            fall: 1,
            start_healthy: false,
            path: Some("/".into()),
            host: None,
            expect: Some(STATUS_2XX.iter().chain(&STATUS_3XX).copied().collect()),
            loc: c.loc(),
        };
        for a in &c.args {
            let (k, v) = a.value.split_once('=').unwrap_or((a.value.as_str(), ""));
            match k {
                "interval" => match nginx_time_ms(v).filter(|&ms| ms > 0) {
                    Some(ms) => h.interval = ms,
                    None => self.warn(c, format!("health_check interval={v} not understood; 5s is used")),
                },
                "fails" => match v.parse::<u64>() {
                    Ok(n) if (1..=1000).contains(&n) => h.fall = n,
                    _ => self.warn(c, format!("health_check fails={v} not understood; 1 is used")),
                },
                "passes" => match v.parse::<u64>() {
                    Ok(n) if (1..=1000).contains(&n) => h.rise = n,
                    _ => self.warn(c, format!("health_check passes={v} not understood; 1 is used")),
                },
                "uri" if v.starts_with('/') && !v.bytes().any(|b| b.is_ascii_control() || b == b' ') => h.path = Some(v.to_string()),
                "mandatory" | "persistent" => {}
                _ => self.warn(c, format!("health_check parameter \"{}\" not supported; ignored", a.value)),
            }
        }
        h.timeout = h.timeout.min(h.interval);
        self.converted(c, "-> [health] kind = \"http\" on the upstream (nginx Plus health_check)");
        self.ups[i].health = Some(h);
    }

    /// `sticky cookie NAME ...` (nginx Plus) or `sticky [name=] [expires=] ...`
    /// (nginx-sticky-module-ng).
    fn sticky(&mut self, i: usize, d: &Directive) {
        let mut cfg = StickyCfg { loc: Some(d.loc()), ..StickyCfg::default() };
        let plus = d.arg(0) == Some("cookie");
        match d.arg(0) {
            Some("route" | "learn") => {
                self.unsupported(
                    d,
                    format!(
                        "{}: sticky {} is not supported (only cookie stickiness); balanced without stickiness",
                        d.text(),
                        d.arg(0).unwrap_or_default()
                    ),
                );
                return;
            }
            Some("cookie") => match d.arg(1) {
                Some(n) if !n.contains('=') => cfg.name = Some(n.to_string()),
                _ => {
                    self.unsupported(d, format!("{}: expected `sticky cookie NAME ...`; balanced without stickiness", d.text()));
                    return;
                }
            },
            _ => {}
        }
        let skip = if plus { 2 } else { 0 };
        let mut httponly = false;
        for a in d.args.iter().skip(skip) {
            let (k, v) = a.value.split_once('=').unwrap_or((a.value.as_str(), ""));
            match k {
                "name" if !plus => cfg.name = Some(v.to_string()),
                "expires" => {
                    if v == "max" {
                        cfg.max_age = Some("3650d".into());
                        self.converted(d, "expires=max -> max_age = \"3650d\"");
                    } else {
                        match nginx_time_ms(v).filter(|&ms| ms >= 1000) {
                            Some(ms) => cfg.max_age = Some(fmt_ms(ms / 1000 * 1000)),
                            None => self.warn(d, format!("expires={v} not understood; a session cookie is used")),
                        }
                    }
                }
                "domain" => {
                    let dom = v.trim_start_matches('.');
                    if !dom.is_empty() && dom.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-') {
                        cfg.domain = Some(dom.to_ascii_lowercase());
                    } else {
                        self.warn(d, format!("cookie domain \"{v}\" not usable; no Domain attribute"));
                    }
                }
                "path" => {
                    if v.starts_with('/') && v.bytes().all(|b| b.is_ascii_graphic() && b != b';' && b != b',') {
                        cfg.path = Some(v.to_string());
                    } else {
                        self.warn(d, format!("cookie path \"{v}\" not usable; \"/\" is used"));
                    }
                }
                "samesite" => match v.to_ascii_lowercase().as_str() {
                    "strict" => cfg.same_site = Some("strict"),
                    "lax" => cfg.same_site = Some("lax"),
                    "none" => cfg.same_site = Some("none"),
                    _ => self.warn(d, format!("samesite={v} not understood; SameSite=Lax is used")),
                },
                "httponly" => httponly = true,
                "secure" => self.converted(d, "secure: tidegate marks the cookie Secure on TLS listeners"),
                "hash" if !plus => {
                    self.converted(d, format!("hash={v} ignored: tidegate's cookie carries an opaque server id"));
                }
                "hmac" if !plus => {}
                "hmac_key" if !plus => {
                    if v.len() >= 16 {
                        cfg.secret = Some(v.to_string());
                        self.converted(d, "hmac_key -> cookie secret (HMAC-SHA256)");
                    } else {
                        self.warn(d, "hmac_key is shorter than the 16 characters tidegate needs for a cookie secret; cookies are unsigned");
                    }
                }
                "no_fallback" if !plus => {
                    self.warn(d, "no_fallback not supported: a cookie naming an unavailable server is rebalanced and re-set")
                }
                "transfer" | "delimiter" if !plus => self.warn(d, format!("{} ignored", a.value)),
                _ => self.warn(d, format!("sticky parameter \"{}\" not understood; ignored", a.value)),
            }
        }
        if let Some(n) = &cfg.name
            && (n.is_empty() || !n.bytes().all(is_cookie_name_byte))
        {
            self.warn(d, format!("cookie name \"{n}\" is not a valid cookie name; \"tg_srv\" is used"));
            cfg.name = None;
        }
        if !plus && cfg.name.is_none() {
            cfg.name = Some("route".into());
        }
        if !httponly {
            self.converted(d, "tidegate always marks its sticky cookie HttpOnly");
        }
        if matches!(self.ups[i].method, Method::IpHash | Method::Hash { .. }) {
            self.warn(d, "clients without the cookie are balanced by least_conn: tidegate's cookie fallback cannot hash");
        }
        self.converted(
            d,
            "-> balance = \"cookie\"; tidegate's cookie values are its own opaque ids, so clients holding an nginx cookie are rebalanced once and get a new cookie",
        );
        self.ups[i].sticky = Some(cfg);
    }
}

/// The registered statuses of each class, for `check_http_expect_alive http_2xx ...` (tidegate
/// lists statuses; an unregistered one like 299 is not expected from a health endpoint).
const STATUS_1XX: [u16; 4] = [100, 101, 102, 103];
const STATUS_2XX: [u16; 10] = [200, 201, 202, 203, 204, 205, 206, 207, 208, 226];
const STATUS_3XX: [u16; 9] = [300, 301, 302, 303, 304, 305, 306, 307, 308];
const STATUS_4XX: [u16; 29] = [
    400, 401, 402, 403, 404, 405, 406, 407, 408, 409, 410, 411, 412, 413, 414, 415, 416, 417, 418, 421, 422, 423, 424, 425, 426, 428, 429,
    431, 451,
];
const STATUS_5XX: [u16; 11] = [500, 501, 502, 503, 504, 505, 506, 507, 508, 510, 511];

/// RFC 6265 cookie-name (an HTTP token).
fn is_cookie_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// nginx's hash key (`$remote_addr`, `$cookie_x`, ...) as a tidegate key, with a caveat
/// when the match is not exact.
fn hash_key(raw: &str, stream: bool) -> Result<(String, Option<String>), String> {
    let Some(var) = single_var(raw) else {
        return Err(format!(
            "hash key \"{raw}\" is not a single variable; tidegate hashes one of $remote_addr, $cookie_NAME, $http_NAME, $arg_NAME, $request_uri, $uri"
        ));
    };
    let ok_name = |n: &str| !n.is_empty() && n.bytes().all(is_cookie_name_byte);
    let key = match var.as_str() {
        "remote_addr" => ("ip".to_string(), None),
        "binary_remote_addr" => (
            "ip".to_string(),
            Some("$binary_remote_addr becomes key = \"ip\": tidegate hashes the address as text (like $remote_addr), nginx hashed its 4 or 16 bytes, so clients map to other servers once after the switch".to_string()),
        ),
        _ if stream => return Err(format!("hash key ${var} cannot be used for TCP: only $remote_addr is available there")),
        "request_uri" => (
            "path".to_string(),
            Some("$request_uri becomes key = \"path\": tidegate hashes the path without the query string, so URIs differing only in their query string share a server".to_string()),
        ),
        "uri" => (
            "path".to_string(),
            Some("$uri becomes key = \"path\": tidegate hashes the path as received (not percent-decoded or normalised as nginx's $uri is)".to_string()),
        ),
        v if v.starts_with("cookie_") && ok_name(&v[7..]) => (format!("cookie:{}", &v[7..]), None),
        v if v.starts_with("arg_") && ok_name(&v[4..]) => (format!("query:{}", &v[4..]), None),
        v if v.starts_with("http_") && ok_name(&v[5..]) => {
            let header: Vec<String> = v[5..]
                .split('_')
                .map(|w| {
                    let mut c = w.chars();
                    c.next().map(|f| f.to_ascii_uppercase().to_string() + c.as_str()).unwrap_or_default()
                })
                .collect();
            (format!("header:{}", header.join("-")), None)
        }
        other => {
            return Err(format!(
                "hash key ${other} has no tidegate equivalent (keys: $remote_addr, $cookie_NAME, $http_NAME, $arg_NAME, $request_uri, $uri)"
            ));
        }
    };
    Ok(key)
}

/// An upstream `server` address as tidegate's `addr` text, and whether it differs from
/// what nginx wrote (no port, a host name).
fn server_addr(raw: &str, default_port: Option<u16>) -> Result<(String, bool), String> {
    if let Ok(sa) = raw.parse::<SocketAddr>() {
        if sa.port() == 0 {
            return Err("port 0 is not a valid server port".into());
        }
        let canonical = sa.to_string();
        let differs = canonical != raw;
        return Ok((canonical, differs));
    }
    let (host, port) = split_host_port(raw)?;
    let port = match (port, default_port) {
        (Some(p), _) => p,
        (None, Some(p)) => p,
        (None, None) => return Err(format!("\"{raw}\" has no port (stream servers need one)")),
    };
    if port == 0 {
        return Err("port 0 is not a valid server port".into());
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok((SocketAddr::new(ip, port).to_string(), true));
    }
    if !is_hostname(host) {
        return Err(format!("\"{raw}\" is not an address tidegate understands (IP:PORT or host:port)"));
    }
    Ok((format!("{host}:{port}"), true))
}

/// `host:port`, `[v6]:port`, `host`, `[v6]`.
fn split_host_port(raw: &str) -> Result<(&str, Option<u16>), String> {
    let bad = || format!("\"{raw}\" is not an address tidegate understands (IP:PORT or host:port)");
    if let Some(rest) = raw.strip_prefix('[') {
        let (inside, after) = rest.split_once(']').ok_or_else(bad)?;
        inside.parse::<Ipv6Addr>().map_err(|_| bad())?;
        return match after {
            "" => Ok((inside, None)),
            p => Ok((inside, Some(p.strip_prefix(':').and_then(|p| p.parse().ok()).ok_or_else(bad)?))),
        };
    }
    match raw.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => Ok((h, Some(p.parse().map_err(|_| bad())?))),
        Some(_) => Err(bad()),
        None => Ok((raw, None)),
    }
}

fn is_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        && !h.starts_with(['.', '-'])
        && !h.split('.').any(str::is_empty)
}

// =======================================================================================
// Converter: http server and location blocks
// =======================================================================================

/// A location's match.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LocKind {
    Prefix(String),
    Exact(String),
    Regex(String),
    Named(String),
}

fn location_kind(d: &Directive) -> Option<LocKind> {
    match (d.arg(0), d.arg(1), d.args.len()) {
        (Some("="), Some(p), 2) => Some(LocKind::Exact(p.to_string())),
        (Some("^~"), Some(p), 2) => Some(LocKind::Prefix(p.to_string())),
        (Some("~" | "~*"), Some(p), 2) => Some(LocKind::Regex(p.to_string())),
        (Some(a), None, 1) => Some(if let Some(p) = a.strip_prefix('=') {
            LocKind::Exact(p.to_string())
        } else if let Some(p) = a.strip_prefix("^~") {
            LocKind::Prefix(p.to_string())
        } else if let Some(p) = a.strip_prefix("~*").or_else(|| a.strip_prefix('~')) {
            LocKind::Regex(p.to_string())
        } else if a.starts_with('@') {
            LocKind::Named(a.to_string())
        } else {
            LocKind::Prefix(a.to_string())
        }),
        _ => None,
    }
}

impl Cx {
    fn http_server(&mut self, d: &Directive, http: &Scope) {
        let block = d.children();
        let scope = self.scope(block, http, Ctx::Server);
        let mut server = HttpServer {
            loc: d.loc(),
            listens: Vec::new(),
            names: Vec::new(),
            routes: Vec::new(),
            scope: scope.clone(),
            answers_itself: block.iter().any(|c| c.name == "return"),
        };
        for c in block {
            match c.name.as_str() {
                "listen" => {
                    if let Some(l) = self.listen(c, false) {
                        server.listens.push(l);
                    }
                }
                "server_name" => {
                    for a in &c.args {
                        server.names.push((a.value.clone(), c.loc()));
                    }
                }
                "if" => self.if_block(c),
                "location" => self.location(c, &scope, &mut server.routes, 0),
                "proxy_pass" => self.unsupported(c, "proxy_pass is only valid inside a location; ignored"),
                _ => {}
            }
        }
        if server.answers_itself {
            if !server.routes.is_empty() {
                self.unsupported(
                    d,
                    "this server block answers every request with `return` before any location: its locations are left out",
                );
            }
            server.routes.clear();
        }
        self.servers.push(server);
    }

    /// `listen` in an http or stream server.
    fn listen(&mut self, d: &Directive, stream: bool) -> Option<ListenSpec> {
        let Some(raw) = d.arg(0) else {
            self.unsupported(d, "listen without an address; ignored");
            return None;
        };
        if raw.starts_with("unix:") {
            self.unsupported(d, format!("{}: unix-socket listeners are not supported; ignored", d.text()));
            return None;
        }
        let addr = match listen_addr(raw) {
            Ok((a, note)) => {
                if let Some(n) = note {
                    self.converted(d, n);
                }
                a
            }
            Err(why) => {
                self.unsupported(d, format!("{}: {why}; ignored", d.text()));
                return None;
            }
        };
        let mut l = ListenSpec { addr, ssl: false, default: false, proxy_protocol: false, loc: d.loc() };
        let mut options = Vec::new();
        for a in d.args.iter().skip(1) {
            let p = a.value.as_str();
            match p.split_once('=').map_or(p, |(k, _)| k) {
                "default_server" | "default" if !stream => l.default = true,
                "ssl" => l.ssl = true,
                "proxy_protocol" => l.proxy_protocol = true,
                "http2" if !stream => self.warn(d, "http2: tidegate speaks HTTP/1.1 (ALPN http/1.1); HTTP/2 clients fall back to it"),
                "quic" | "http3" if !stream => {
                    self.warn(d, format!("{}: HTTP/3 (QUIC) is not supported; clients fall back to the TCP listener", d.text()));
                    return None;
                }
                "udp" if stream => {
                    self.unsupported(d, format!("{}: UDP proxying is not supported; ignored", d.text()));
                    return None;
                }
                "ipv6only" => options.push(p.to_string()),
                _ => options.push(p.to_string()),
            }
        }
        if !options.is_empty() {
            self.warn(d, format!("listen options not carried over (tidegate sets its own socket options): {}", options.join(" ")));
        }
        Some(l)
    }

    fn if_block(&mut self, d: &Directive) {
        let changes = d
            .children()
            .iter()
            .any(|c| matches!(c.name.as_str(), "return" | "rewrite" | "proxy_pass" | "set" | "try_files" | "break" | "deny" | "allow"));
        let cond: Vec<&str> = d.args.iter().map(|a| a.value.as_str()).collect();
        let what = format!("if {}", cond.join(" "));
        if changes {
            self.unsupported(d, format!("`{what}` decides per request what happens (return/rewrite/proxy_pass inside); not converted"));
        } else {
            self.warn(d, format!("`{what}` not carried over: tidegate has no conditionals"));
        }
    }

    /// A `location` (and the ones nested in it): one draft route when it proxies.
    fn location(&mut self, d: &Directive, parent: &Scope, routes: &mut Vec<DraftRoute>, depth: usize) {
        if depth > 16 {
            return;
        }
        let Some(kind) = location_kind(d) else {
            self.unsupported(d, format!("{}: cannot read this location; not converted", d.text()));
            return;
        };
        let block = d.children();
        let proxy_pass: Vec<&Directive> = block.iter().filter(|c| c.name == "proxy_pass").collect();
        let proxies = !proxy_pass.is_empty();
        let label = format!("location {}", d.args.iter().map(|a| a.value.as_str()).collect::<Vec<_>>().join(" "));
        match &kind {
            LocKind::Regex(r) => {
                self.unsupported(
                    d,
                    format!("regex location `{label}` cannot be converted: tidegate routes by plain path prefix (\"{r}\")"),
                );
                return;
            }
            LocKind::Named(n) => {
                if proxies {
                    self.warn(
                        d,
                        format!("named location {n} is only reached through try_files/error_page, which tidegate does not have; left out"),
                    );
                }
                return;
            }
            _ => {}
        }
        let scope = self.scope(block, parent, Ctx::Location { proxies });
        for c in block {
            match c.name.as_str() {
                "if" => self.if_block(c),
                "location" => self.location(c, &scope, routes, depth + 1),
                _ => {}
            }
        }
        let path = match &kind {
            LocKind::Prefix(p) | LocKind::Exact(p) => p.clone(),
            _ => String::new(),
        };
        if !proxies {
            let nested_only = block.iter().all(|c| c.name == "location");
            if !nested_only {
                let what = if let Some(r) = block.iter().find(|c| c.name == "return") {
                    format!("answers with `{}`", r.text())
                } else if let Some(p) = block.iter().find(|c| c.name.ends_with("_pass")) {
                    format!("uses `{}`", p.text())
                } else if block.iter().any(|c| c.name.contains("_by_lua") || c.name == "js_content" || c.name == "stub_status") {
                    "answers requests itself".to_string()
                } else {
                    "serves files".to_string()
                };
                self.unsupported(
                    d,
                    format!("`{label}` does not proxy ({what}): not carried over; tidegate answers 404 for these paths unless another route matches"),
                );
            }
            return;
        }
        if proxy_pass.len() > 1 {
            self.warn(proxy_pass[1], "more than one proxy_pass in this location; the last one is used");
        }
        let pp = proxy_pass[proxy_pass.len() - 1];
        if block.iter().any(|c| c.name == "return") {
            self.unsupported(d, format!("`{label}` answers with `return` before proxying; left out"));
            return;
        }
        if let Err(why) = check_path(&path) {
            self.unsupported(d, format!("`{label}`: {why}; left out"));
            return;
        }
        let Some(up) = self.proxy_target(pp, Some(&path), &scope, false) else { return };
        if let Some(hc) = block.iter().find(|c| c.name == "health_check") {
            self.plus_health_check(up, hc);
        }
        let ws = self.websocket(&scope);
        self.header_notes(&scope, up, pp);
        self.ups[up].uses.push(Use {
            loc: pp.loc(),
            ws,
            stream: false,
            connect: scope.connect.clone(),
            read: scope.read.clone(),
            send: scope.send.clone(),
            stream_timeout: None,
            tries: scope.tries.clone(),
            next_upstream: scope.next_upstream.clone(),
            send_proxy: None,
        });
        let exact = matches!(kind, LocKind::Exact(_));
        routes.push(DraftRoute { prefix: if path == "/" && !exact { None } else { Some(path) }, exact, upstream: up, loc: d.loc(), label });
    }

    /// Whether the location carries the WebSocket idiom (`Upgrade $http_upgrade` and
    /// `Connection upgrade`/`$connection_upgrade`).
    fn websocket(&mut self, scope: &Scope) -> bool {
        let upgrade = scope.headers.iter().find(|h| h.name == "upgrade" && h.value.contains("$http_upgrade"));
        let connection = scope.headers.iter().find(|h| {
            h.name == "connection"
                && (h.value.eq_ignore_ascii_case("upgrade")
                    || single_var(&h.value).is_some_and(|v| {
                        v == "http_connection" || self.maps.iter().any(|m| m.target == v && m.source == "http_upgrade" && !m.stream)
                    }))
        });
        match (upgrade, connection) {
            (Some(u), Some(_)) => {
                let loc = u.loc.clone();
                self.note(
                    &loc,
                    Level::Converted,
                    "WebSocket idiom (Upgrade/Connection headers) recognised: tidegate upgrades by itself when the server answers 101; nothing to emit",
                );
                true
            }
            (Some(u), None) | (None, Some(u)) => {
                let loc = u.loc.clone();
                self.note(&loc, Level::Converted, "half of the WebSocket header idiom; tidegate handles upgrades by itself");
                true
            }
            (None, None) => false,
        }
    }

    /// Notes on the `proxy_set_header`s in force for one proxied location.
    fn header_notes(&mut self, scope: &Scope, up: usize, pp: &Directive) {
        let mut host_set = false;
        for h in scope.headers.clone() {
            let v = h.value.as_str();
            let (level, msg) = match h.name.as_str() {
                "upgrade" | "connection" if v.is_empty() || v.contains('$') || v.eq_ignore_ascii_case("upgrade") => {
                    if v.is_empty() {
                        (Level::Converted, "Connection \"\" (upstream keep-alive idiom): tidegate pools connections by itself".to_string())
                    } else {
                        continue;
                    }
                }
                "host" => {
                    host_set = true;
                    match v {
                        "$host" | "$http_host" => (Level::Converted, "Host: tidegate passes the client's Host header through".to_string()),
                        _ => (
                            Level::Warning,
                            format!("Host {v:?} not carried over: tidegate passes the client's Host header through unchanged"),
                        ),
                    }
                }
                "x-forwarded-for" if v == "$proxy_add_x_forwarded_for" || v == "$remote_addr" => (
                    Level::Converted,
                    "X-Forwarded-For: tidegate sets it (appending only for peers in trusted_proxies, where nginx's $proxy_add_x_forwarded_for appends for anyone)".to_string(),
                ),
                "x-forwarded-proto" if v == "$scheme" => (Level::Converted, "X-Forwarded-Proto: tidegate sets it".to_string()),
                "x-forwarded-host" if v == "$host" || v == "$http_host" => {
                    (Level::Converted, "X-Forwarded-Host: tidegate sets it".to_string())
                }
                "x-real-ip" => (
                    Level::Warning,
                    "X-Real-IP is not set by tidegate; servers can read the client address from X-Forwarded-For".to_string(),
                ),
                _ => (Level::Warning, format!("header {} {v:?} not set: tidegate does not add request headers", h.name)),
            };
            self.note(&h.loc, level, msg);
        }
        if !host_set && !self.ups[up].host_warned && !self.ups[up].stream {
            self.ups[up].host_warned = true;
            let name = self.ups[up].label.clone();
            self.warn(
                pp,
                format!("no `proxy_set_header Host`: nginx sent its proxy host ({name}) as Host; tidegate passes the client's Host header through"),
            );
        }
    }

    /// The upstream a `proxy_pass` names (an upstream, or an address made into a
    /// one-server upstream). `location`: the location's path, to check a URI part.
    fn proxy_target(&mut self, pp: &Directive, location: Option<&str>, scope: &Scope, stream: bool) -> Option<usize> {
        let Some(url) = pp.arg(0).filter(|_| pp.args.len() == 1) else {
            self.unsupported(pp, format!("{}: expected one URL; left out", pp.text()));
            return None;
        };
        if has_vars(url) {
            self.unsupported(pp, format!("{}: the target is computed per request (variables); left out", pp.text()));
            return None;
        }
        let (tls, rest) = if stream {
            (false, url)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else {
            self.unsupported(pp, format!("{}: expected an http:// or https:// URL; left out", pp.text()));
            return None;
        };
        if rest.starts_with("unix:") {
            self.unsupported(pp, format!("{}: unix sockets are not supported; left out", pp.text()));
            return None;
        }
        let (authority, uri) = match rest.find('/') {
            Some(i) if !stream => (&rest[..i], Some(&rest[i..])),
            _ => (rest, None),
        };
        if let (Some(uri), Some(path)) = (uri, location)
            && uri != path
        {
            self.unsupported(
                pp,
                format!("{}: the URI part \"{uri}\" replaces the location's \"{path}\" in the forwarded path; tidegate forwards the path unchanged; left out", pp.text()),
            );
            return None;
        }
        let names = if stream { &self.stream_names } else { &self.http_names };
        // nginx matches upstream names case-insensitively.
        let named = names.get(authority).or_else(|| names.iter().find(|(n, _)| n.eq_ignore_ascii_case(authority)).map(|(_, i)| i));
        let up = if let Some(&i) = named {
            Some(i)
        } else {
            match server_addr(authority, if stream { None } else { Some(if tls { 443 } else { 80 }) }) {
                Ok((addr, _)) => Some(self.address_upstream(addr, authority, pp, stream, tls)),
                Err(why) => {
                    self.unsupported(pp, format!("{}: {why}; left out", pp.text()));
                    None
                }
            }
        }?;
        if let Some(why) = self.ups[up].dead.clone() {
            let name = self.ups[up].name.clone();
            self.unsupported(pp, format!("{}: upstream \"{name}\" could not be converted ({why}); left out", pp.text()));
            return None;
        }
        if tls {
            self.upstream_tls(up, authority, scope, pp);
        } else if self.ups[up].tls.is_some() {
            self.unsupported(
                pp,
                format!("{}: upstream \"{}\" is also used with https://; tidegate uses TLS for all of it", pp.text(), self.ups[up].name),
            );
        }
        Some(up)
    }

    /// `proxy_pass http://10.0.0.5:8080`: a one-server upstream, shared by every location
    /// naming the same address.
    fn address_upstream(&mut self, addr: String, authority: &str, pp: &Directive, stream: bool, tls: bool) -> usize {
        if let Some(&i) = self.addr_ups.get(&(stream, addr.clone(), tls)) {
            return i;
        }
        let name = self.claim_name(&addr.replace(['[', ']'], "").replace(':', "-"));
        let label = format!("proxy_pass {}", pp.arg(0).unwrap_or_default());
        let i = self.new_up(name.clone(), label, pp.loc(), stream);
        let non_canonical = authority.parse::<SocketAddr>().is_err();
        if authority.parse::<SocketAddr>().is_err()
            && !authority.trim_start_matches('[').starts_with(|c: char| c.is_ascii_digit() || c == ':')
        {
            self.converted(
                pp,
                format!("\"{authority}\" is resolved once when tidegate loads the config (nginx resolved it at startup too)"),
            );
        }
        self.ups[i].servers.push(Srv {
            addr: addr.clone(),
            weight: 1,
            max_fails: None,
            fail_timeout: None,
            backup: false,
            down: false,
            max_conns: None,
            loc: pp.loc(),
            non_canonical,
        });
        self.converted(pp, format!("-> one-server upstream \"{name}\""));
        self.addr_ups.insert((stream, addr, tls), i);
        i
    }

    fn upstream_tls(&mut self, up: usize, authority: &str, scope: &Scope, pp: &Directive) {
        let verify = scope.ssl_verify.as_ref().is_some_and(|v| v.0);
        let ca = scope.ssl_trusted.as_ref().map(|(p, _)| self.path_text(p));
        let host = split_host_port(authority).map(|(h, _)| h.to_string()).unwrap_or_default();
        let sni = match &scope.ssl_name {
            Some((n, _)) if !has_vars(n) && is_hostname(n) && n.parse::<IpAddr>().is_err() => Some(n.clone()),
            _ if scope.ssl_server_name && is_hostname(&host) && host.parse::<IpAddr>().is_err() && !self.http_names.contains_key(&host) => {
                Some(host)
            }
            _ => None,
        };
        if self.ups[up].tls.is_none() {
            if !verify {
                self.warn(
                    pp,
                    "https:// upstream: nginx does not verify server certificates without `proxy_ssl_verify on`; kept as verify = false (tidegate warns at every load); set verify = true (and ca) to check them",
                );
            } else {
                self.converted(pp, "-> [upstream.tls] with certificate verification");
            }
            self.ups[up].tls = Some(UpTls { verify, ca, sni, loc: pp.loc() });
        }
    }

    /// A path from the nginx config, as written into the TOML: relative paths are resolved
    /// against nginx's conf prefix (the main file's directory).
    fn path_text(&self, p: &str) -> String {
        let path = Path::new(p);
        let full = if path.is_absolute() { path.to_path_buf() } else { self.prefix.join(path) };
        full.to_string_lossy().into_owned()
    }
}

/// `location` paths tidegate can use as `path_prefix`.
fn check_path(p: &str) -> Result<(), String> {
    if !p.starts_with('/') {
        return Err(format!("path \"{p}\" does not start with \"/\""));
    }
    if p.chars().any(|c| c.is_whitespace() || c.is_control()) || p.contains(['?', '#']) {
        return Err(format!("path \"{p}\" holds spaces, '?' or '#', which a path_prefix cannot"));
    }
    Ok(())
}

/// A `listen` address: `80`, `*:80`, `127.0.0.1`, `127.0.0.1:8080`, `[::]:80`,
/// `localhost:8080`; with a note when something was assumed.
fn listen_addr(raw: &str) -> Result<(SocketAddr, Option<String>), String> {
    if let Ok(port) = raw.parse::<u16>() {
        return Ok((SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)), None));
    }
    if let Some(p) = raw.strip_prefix("*:") {
        let port = p.parse::<u16>().map_err(|_| format!("invalid port in \"{raw}\""))?;
        return Ok((SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)), None));
    }
    if let Ok(sa) = raw.parse::<SocketAddr>() {
        return Ok((sa, None));
    }
    let (host, port) = split_host_port(raw)?;
    let port = port.unwrap_or(80);
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok((SocketAddr::new(ip, port), None));
    }
    if host.eq_ignore_ascii_case("localhost") {
        return Ok((
            SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            Some(format!("listen {raw} -> bind 127.0.0.1:{port} (tidegate binds IP addresses)")),
        ));
    }
    Err(format!("tidegate binds IP addresses, not the host name \"{host}\""))
}

// =======================================================================================
// Converter: stream servers
// =======================================================================================

impl Cx {
    fn stream_server(&mut self, d: &Directive, stream: &Scope) {
        let block = d.children();
        let scope = self.scope(block, stream, Ctx::StreamServer);
        let listens: Vec<ListenSpec> = block.iter().filter(|c| c.name == "listen").filter_map(|c| self.listen(c, true)).collect();
        let pp: Vec<&Directive> = block.iter().filter(|c| c.name == "proxy_pass").collect();
        let Some(&pp) = pp.last() else {
            self.unsupported(d, "stream server without proxy_pass (it answers itself, e.g. `return`); not converted");
            return;
        };
        if listens.is_empty() {
            self.unsupported(d, "stream server without a listen address; not converted");
            return;
        }
        let target = pp.arg(0).unwrap_or_default();
        let mut routes = Vec::new();
        let mut upstream = None;
        let mut mode = "tcp";
        if let Some(var) = single_var(target) {
            let Some(m) = self.map_for(&var, true).cloned() else {
                self.unsupported(pp, format!("{}: the target is computed per connection from ${var}; not converted", pp.text()));
                return;
            };
            if m.source != "ssl_preread_server_name" {
                self.unsupported(
                    pp,
                    format!("{}: ${var} maps ${}; only a map of $ssl_preread_server_name (SNI) converts", pp.text(), m.source),
                );
                return;
            }
            if !scope.ssl_preread {
                self.warn(
                    pp,
                    "the map reads $ssl_preread_server_name but `ssl_preread on` is missing here; converted as SNI routing anyway",
                );
            }
            mode = "tls_passthrough";
            routes = self.sni_routes(&m, &scope);
            if routes.is_empty() {
                self.unsupported(d, "no SNI route could be converted; listener left out");
                return;
            }
        } else {
            let Some(up) = self.proxy_target(pp, None, &scope, true) else { return };
            self.stream_use(up, &scope, pp);
            if scope.ssl_preread {
                self.converted(pp, "ssl_preread with a fixed target: a plain tcp listener (TLS passes through untouched)");
            }
            upstream = Some(up);
        }
        let ssl = listens.iter().any(|l| l.ssl);
        if ssl && mode == "tls_passthrough" {
            self.unsupported(d, "`listen ... ssl` with SNI routing: tidegate either terminates TLS (tcp) or routes it untouched (tls_passthrough); listener left out");
            return;
        }
        let certs = if ssl { self.certificates(&[&scope], 0, d) } else { Vec::new() };
        if ssl && certs.is_empty() {
            self.unsupported(d, "`listen ... ssl` without a usable ssl_certificate/ssl_certificate_key pair; listener left out");
            return;
        }
        let min_version = if ssl { self.min_version(&scope) } else { None };
        let accept_proxy = listens.iter().find(|l| l.proxy_protocol).map(|l| l.loc.clone());
        let (trusted, trusted_comment) = self.trusted(&[&scope], accept_proxy.as_ref());
        for l in listens {
            let wildcard = l.addr.ip().is_unspecified();
            let base = if mode == "tls_passthrough" {
                "tls"
            } else if ssl {
                "tcps"
            } else {
                "tcp"
            };
            let name = if wildcard && l.addr.is_ipv4() {
                format!("{base}-{}", l.addr.port())
            } else {
                format!("{base}-{}-{}", l.addr.ip(), l.addr.port())
            };
            let comment = format!("{} (stream server), {}", self.at(&d.loc()), self.at(&l.loc));
            self.listeners.push(OutListener {
                loc: l.loc.clone(),
                name,
                bind: l.addr.to_string(),
                mode,
                comment,
                upstream,
                accept_proxy: accept_proxy.clone(),
                trusted: trusted.clone(),
                trusted_comment: trusted_comment.clone(),
                keepalive_idle: None,
                header_read: None,
                body_timeout: None,
                send_timeout: None,
                underscores: None,
                certs: certs.clone(),
                min_version: min_version.clone(),
                no_alpn: ssl,
                routes: routes.clone(),
            });
        }
    }

    fn stream_use(&mut self, up: usize, scope: &Scope, pp: &Directive) {
        self.ups[up].uses.push(Use {
            loc: pp.loc(),
            ws: false,
            stream: true,
            connect: scope.connect.clone(),
            read: None,
            send: None,
            stream_timeout: scope.stream_timeout.clone(),
            tries: scope.tries.clone(),
            next_upstream: None,
            send_proxy: scope.send_proxy.clone(),
        });
        if let Some(l) = &scope.proxy_ssl
            && self.ups[up].tls.is_none()
        {
            let verify = scope.ssl_verify.as_ref().is_some_and(|v| v.0);
            let ca = scope.ssl_trusted.as_ref().map(|(p, _)| self.path_text(p));
            let sni = scope.ssl_name.as_ref().filter(|(n, _)| !has_vars(n) && is_hostname(n)).map(|(n, _)| n.clone());
            self.ups[up].tls = Some(UpTls { verify, ca, sni, loc: l.clone() });
            if !verify {
                self.note(
                    l,
                    Level::Warning,
                    "proxy_ssl: nginx does not verify server certificates without `proxy_ssl_verify on`; kept as verify = false",
                );
            }
        }
    }

    /// `map $ssl_preread_server_name $x { ... }` as SNI routes, in nginx's precedence:
    /// exact names, then wildcards (longest first), then the default.
    fn sni_routes(&mut self, m: &MapDef, scope: &Scope) -> Vec<OutRoute> {
        let mut exact = Vec::new();
        let mut wild = Vec::new();
        for (key, value, loc) in &m.entries {
            let key = key.to_ascii_lowercase();
            let patterns: Vec<(bool, String)> = if key.starts_with('~') {
                self.note(
                    loc,
                    Level::Unsupported,
                    format!("regex SNI key \"{key}\" cannot be converted; tidegate matches exact names and *.wildcards"),
                );
                continue;
            } else if m.hostnames
                && let Some(rest) = key.strip_prefix("*.")
            {
                vec![(true, format!("*.{rest}"))]
            } else if m.hostnames
                && let Some(rest) = key.strip_prefix('.')
            {
                vec![(false, rest.to_string()), (true, format!("*.{rest}"))]
            } else if m.hostnames && key.ends_with(".*") {
                self.note(loc, Level::Unsupported, format!("SNI key \"{key}\" (wildcard at the end) cannot be converted"));
                continue;
            } else {
                vec![(false, key.clone())]
            };
            let Some(up) = self.map_target(value, loc, scope) else { continue };
            for (is_wild, p) in patterns {
                if !is_hostname(p.trim_start_matches("*.")) {
                    self.note(loc, Level::Unsupported, format!("SNI key \"{p}\" is not a host name tidegate can match"));
                    continue;
                }
                if is_wild {
                    self.note(
                        loc,
                        Level::Warning,
                        format!("\"{p}\" matches exactly one more label in tidegate; nginx's wildcard matches any depth"),
                    );
                }
                let route =
                    OutRoute { host: None, sni: Some(p.clone()), prefix: None, upstream: up, comment: format!("{} map {p}", self.at(loc)) };
                if is_wild { wild.push((p.len(), route)) } else { exact.push(route) }
            }
        }
        wild.sort_by_key(|(len, _)| std::cmp::Reverse(*len));
        let mut out = exact;
        out.extend(wild.into_iter().map(|(_, r)| r));
        if let Some((value, loc)) = m.default.clone() {
            if let Some(up) = self.map_target(&value, &loc, scope) {
                out.push(OutRoute { host: None, sni: None, prefix: None, upstream: up, comment: format!("{} map default", self.at(&loc)) });
            }
        } else {
            let loc = m.loc.clone();
            self.note(
                &loc,
                Level::Converted,
                "no map default: a ClientHello matching no name (or without SNI) is refused, as nginx fails to proxy an empty target",
            );
        }
        out
    }

    /// A map value naming a stream upstream or an address.
    fn map_target(&mut self, value: &str, loc: &Loc, scope: &Scope) -> Option<usize> {
        let pp = Directive {
            name: "proxy_pass".into(),
            args: vec![Arg { value: value.to_string(), quoted: false, line: loc.line }],
            file: loc.file.clone(),
            line: loc.line,
            block: None,
        };
        let up = self.proxy_target(&pp, None, scope, true)?;
        self.stream_use(up, scope, &pp);
        Some(up)
    }
}

// =======================================================================================
// Converter: http listeners from server blocks
// =======================================================================================

/// A host pattern from `server_name`: (is wildcard, tidegate host text).
fn host_patterns(name: &str) -> Result<Vec<(bool, String)>, String> {
    let n = name.to_ascii_lowercase();
    if n.is_empty() || n == "_" {
        return Ok(Vec::new());
    }
    if n.starts_with('~') {
        return Err(format!("regex server_name \"{name}\" cannot be converted; tidegate matches exact names and *.wildcards"));
    }
    if n.starts_with('$') {
        return Err(format!("server_name \"{name}\" (a variable) cannot be converted"));
    }
    let out = if let Some(rest) = n.strip_prefix("*.") {
        vec![(true, format!("*.{rest}"))]
    } else if let Some(rest) = n.strip_prefix('.') {
        vec![(false, rest.to_string()), (true, format!("*.{rest}"))]
    } else if n.ends_with(".*") {
        return Err(format!("server_name \"{name}\" (wildcard at the end) cannot be converted"));
    } else {
        vec![(false, n.trim_end_matches('.').to_string())]
    };
    for (_, h) in &out {
        if !is_hostname(h.trim_start_matches("*.")) {
            return Err(format!("server_name \"{name}\" is not a host name tidegate can match"));
        }
    }
    Ok(out)
}

impl Cx {
    fn build_http_listeners(&mut self) {
        let servers = std::mem::take(&mut self.servers);
        // (address, server index, listen spec) for every listen of every server.
        let mut entries: Vec<(SocketAddr, usize, ListenSpec)> = Vec::new();
        for (si, s) in servers.iter().enumerate() {
            if s.listens.is_empty() {
                let l = ListenSpec {
                    addr: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 80)),
                    ssl: false,
                    default: false,
                    proxy_protocol: false,
                    loc: s.loc.clone(),
                };
                self.note(&s.loc, Level::Converted, "server block without listen: nginx's default *:80");
                entries.push((l.addr, si, l));
            } else {
                for l in &s.listens {
                    entries.push((l.addr, si, l.clone()));
                }
            }
        }
        // Canonical addresses: a port with both 0.0.0.0 and [::] becomes one dual-stack [::]
        // listener; a specific address next to a wildcard of its family joins the wildcard.
        let all: Vec<SocketAddr> = entries.iter().map(|e| e.0).collect();
        let has = |ip: IpAddr, port: u16| all.iter().any(|a| a.ip() == ip && a.port() == port);
        let mut canon: Vec<SocketAddr> = Vec::new();
        let mut merged_ports: BTreeSet<u16> = BTreeSet::new();
        for (addr, _, l) in &entries {
            let port = addr.port();
            let v4any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
            let v6any = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
            let c = if addr.ip().is_unspecified() && has(v4any, port) && has(v6any, port) {
                if merged_ports.insert(port) {
                    let loc = l.loc.clone();
                    self.note(&loc, Level::Warning, format!("`listen {port}` and `listen [::]:{port}` (here and in other server blocks) become one listener on [::]:{port}, which takes IPv4 too on Linux (net.ipv6.bindv6only=0)"));
                }
                SocketAddr::new(v6any, port)
            } else if !addr.ip().is_unspecified() && addr.is_ipv4() && has(v4any, port) {
                let loc = l.loc.clone();
                self.note(&loc, Level::Warning, format!("{addr} shares port {port} with a wildcard listen: tidegate cannot route by local address, so its server blocks join the wildcard listener"));
                if has(v6any, port) { SocketAddr::new(v6any, port) } else { SocketAddr::new(v4any, port) }
            } else if !addr.ip().is_unspecified() && addr.is_ipv6() && has(v6any, port) {
                let loc = l.loc.clone();
                self.note(&loc, Level::Warning, format!("{addr} shares port {port} with a wildcard listen: tidegate cannot route by local address, so its server blocks join the wildcard listener"));
                SocketAddr::new(v6any, port)
            } else {
                *addr
            };
            canon.push(c);
        }
        let mut order: Vec<SocketAddr> = Vec::new();
        for c in &canon {
            if !order.contains(c) {
                order.push(*c);
            }
        }
        for addr in order {
            let group: Vec<(usize, &ListenSpec)> =
                entries.iter().zip(&canon).filter(|(_, c)| **c == addr).map(|((_, si, l), _)| (*si, l)).collect();
            self.http_listener(addr, &group, &servers);
        }
    }

    fn http_listener(&mut self, addr: SocketAddr, group: &[(usize, &ListenSpec)], servers: &[HttpServer]) {
        let mut members: Vec<usize> = Vec::new();
        for (si, _) in group {
            if !members.contains(si) {
                members.push(*si);
            }
        }
        let default = group.iter().find(|(_, l)| l.default).map_or(members[0], |(si, _)| *si);
        let ssl = group.iter().any(|(_, l)| l.ssl) || members.iter().any(|&si| servers[si].scope.ssl_on);
        let first = group[0].1.loc.clone();
        let accept_proxy = group.iter().find(|(_, l)| l.proxy_protocol).map(|(_, l)| l.loc.clone());
        let scheme = if ssl { "https" } else { "http" };
        let name = if addr.ip().is_unspecified() {
            format!("{scheme}-{}", addr.port())
        } else {
            format!("{scheme}-{}-{}", addr.ip(), addr.port())
        };
        let comment = members.iter().map(|&si| format!("{} (server)", self.at(&servers[si].loc))).collect::<Vec<_>>().join(", ");

        // Host routes of every server, exact names first, then wildcards longest first.
        let any_other_wildcard = members
            .iter()
            .filter(|&&si| si != default)
            .any(|&si| servers[si].names.iter().any(|(n, _)| n.starts_with('*') || n.starts_with('.')));
        let mut exact: Vec<OutRoute> = Vec::new();
        let mut wild: Vec<(usize, OutRoute)> = Vec::new();
        for &si in &members {
            let s = &servers[si];
            let routes = self.server_routes(s);
            if si == default && !any_other_wildcard {
                continue; // the catch-all below covers its names
            }
            let mut reachable = si == default;
            for (name, loc) in &s.names {
                let patterns = match host_patterns(name) {
                    Ok(p) => p,
                    Err(why) => {
                        let loc = loc.clone();
                        self.note(&loc, Level::Unsupported, why);
                        continue;
                    }
                };
                for (is_wild, host) in patterns {
                    reachable = true;
                    if is_wild {
                        let loc = loc.clone();
                        self.note(
                            &loc,
                            Level::Warning,
                            format!("\"{host}\" matches exactly one more label in tidegate; nginx's wildcard matches any depth"),
                        );
                    }
                    for r in &routes {
                        let route = OutRoute {
                            host: Some(host.clone()),
                            sni: None,
                            prefix: r.prefix.clone(),
                            upstream: r.upstream,
                            comment: format!("{} server_name {host}; {} {}", self.at(loc), self.at(&r.loc), r.label),
                        };
                        if is_wild { wild.push((host.len(), route)) } else { exact.push(route) }
                    }
                }
            }
            if !reachable && !routes.is_empty() {
                let loc = s.loc.clone();
                self.note(
                    &loc,
                    Level::Warning,
                    format!(
                        "server block on {addr} has no usable server_name and is not the default server: nginx never picks it; left out"
                    ),
                );
            }
            if si != default && !routes.is_empty() && !routes.iter().any(|r| r.prefix.is_none()) {
                let loc = s.loc.clone();
                self.note(&loc, Level::Warning, "this server has no `location /`: its other paths fall through to the default server's routes in tidegate, where nginx answered them from this server (404)");
            }
        }
        wild.sort_by_key(|(len, _)| std::cmp::Reverse(*len));
        let mut routes = exact;
        routes.extend(wild.into_iter().map(|(_, r)| r));
        for r in self.server_routes(&servers[default]) {
            routes.push(OutRoute {
                host: None,
                sni: None,
                prefix: r.prefix.clone(),
                upstream: r.upstream,
                comment: format!("{} default server; {} {}", self.at(&servers[default].loc), self.at(&r.loc), r.label),
            });
        }
        if routes.is_empty() {
            self.note(
                &first,
                Level::Unsupported,
                format!("no listener on {addr}: none of its server blocks proxies anything tidegate can route"),
            );
            return;
        }
        let scopes: Vec<&Scope> = members.iter().map(|&si| &servers[si].scope).collect();
        let default_pos = members.iter().position(|&si| si == default).unwrap_or(0);
        let certs = if ssl {
            self.certificates(
                &scopes,
                default_pos,
                &Directive { name: "server".into(), args: Vec::new(), file: first.file.clone(), line: first.line, block: None },
            )
        } else {
            Vec::new()
        };
        if ssl && certs.is_empty() {
            self.note(
                &first,
                Level::Unsupported,
                format!("TLS listener {addr} has no usable ssl_certificate/ssl_certificate_key; left out"),
            );
            return;
        }
        let dscope = &servers[default].scope;
        let min_version = if ssl { self.min_version(dscope) } else { None };
        let (trusted, trusted_comment) = self.trusted(&scopes, accept_proxy.as_ref());
        let keepalive_idle = match dscope.keepalive_timeout.clone() {
            Some((0, loc)) => {
                self.note(
                    &loc,
                    Level::Warning,
                    "keepalive_timeout 0 (no client keep-alive) is not supported; tidegate's default 60s applies",
                );
                None
            }
            other => other,
        };
        let header_read = dscope.header_timeout.clone().filter(|(ms, _)| *ms > 0);
        let body_timeout = dscope.body_timeout.clone().filter(|(ms, _)| *ms > 0);
        let send_timeout = dscope.send_timeout.clone().filter(|(ms, _)| *ms > 0);
        let underscores = dscope.underscores.clone();
        for &si in &members {
            let sc = &servers[si].scope;
            let differs = |a: &Val<u64>, b: &Val<u64>| a.as_ref().map(|v| v.0) != b.as_ref().map(|v| v.0);
            if si != default
                && (differs(&sc.keepalive_timeout, &dscope.keepalive_timeout)
                    || differs(&sc.header_timeout, &dscope.header_timeout)
                    || differs(&sc.body_timeout, &dscope.body_timeout)
                    || differs(&sc.send_timeout, &dscope.send_timeout))
            {
                let loc = servers[si].loc.clone();
                self.note(&loc, Level::Warning, format!("client timeouts of this server block differ from the default server's on {addr}; tidegate has one set per listener: the default server's is used"));
            }
        }
        self.listeners.push(OutListener {
            loc: first.clone(),
            name,
            bind: addr.to_string(),
            mode: "http",
            comment,
            upstream: None,
            accept_proxy,
            trusted,
            trusted_comment,
            keepalive_idle,
            header_read,
            body_timeout,
            send_timeout,
            underscores,
            certs,
            min_version,
            no_alpn: false,
            routes,
        });
    }

    /// A server's proxying locations in nginx's precedence: longest prefix first (an exact
    /// match first among equals); an exact match another route would shadow is left out.
    fn server_routes(&mut self, s: &HttpServer) -> Vec<DraftRoute> {
        let mut out: Vec<DraftRoute> = Vec::new();
        for r in &s.routes {
            if r.exact {
                let p = r.prefix.clone().unwrap_or_default();
                let shadowed = s.routes.iter().any(|o| !std::ptr::eq(o, r) && o.prefix.as_deref().unwrap_or("/").starts_with(&p));
                if shadowed {
                    let loc = r.loc.clone();
                    self.note(&loc, Level::Unsupported, format!("`{}` is an exact match; as a tidegate path_prefix it would also take paths of other locations starting with \"{p}\"; left out", r.label));
                    continue;
                }
                let loc = r.loc.clone();
                self.note(
                    &loc,
                    Level::Warning,
                    format!("`{}` is an exact match; tidegate routes every path starting with \"{p}\" there", r.label),
                );
            }
            out.push(r.clone());
        }
        out.sort_by_key(|r| (std::cmp::Reverse(r.prefix.as_ref().map_or(0, String::len)), !r.exact));
        out
    }

    /// Certificates of the servers on one TLS listener; the default server's first is the
    /// default certificate.
    fn certificates(&mut self, scopes: &[&Scope], default_pos: usize, at: &Directive) -> Vec<(String, String, bool, Loc)> {
        let mut out: Vec<(String, String, bool, Loc)> = Vec::new();
        for (pos, s) in scopes.iter().enumerate() {
            if s.certs.len() != s.keys.len() {
                let loc = s.certs.first().or(s.keys.first()).map_or_else(|| at.loc(), |(_, l)| l.clone());
                self.note(
                    &loc,
                    Level::Unsupported,
                    "ssl_certificate and ssl_certificate_key do not pair up; these certificates are left out",
                );
                continue;
            }
            for (i, ((cert, loc), (key, _))) in s.certs.iter().zip(&s.keys).enumerate() {
                if has_vars(cert) || has_vars(key) || cert.starts_with("data:") || key.starts_with("data:") || key.starts_with("engine:") {
                    self.note(
                        loc,
                        Level::Unsupported,
                        format!("certificate \"{cert}\" / key \"{key}\": variables, data: and engine: are not supported; left out"),
                    );
                    continue;
                }
                let (cert, key) = (self.path_text(cert), self.path_text(key));
                if out.iter().any(|(c, _, _, _)| *c == cert) {
                    continue;
                }
                out.push((cert, key, pos == default_pos && i == 0, loc.clone()));
            }
        }
        if !out.is_empty() && !out.iter().any(|c| c.2) {
            out[0].2 = true;
        }
        out
    }

    fn min_version(&mut self, s: &Scope) -> Val<&'static str> {
        let (list, loc) = s.protocols.clone()?;
        let has = |v: &str| list.iter().any(|p| p == v);
        let old: Vec<&String> = list.iter().filter(|p| matches!(p.as_str(), "SSLv2" | "SSLv3" | "TLSv1" | "TLSv1.1")).collect();
        if !old.is_empty() {
            let old: Vec<&str> = old.iter().map(|s| s.as_str()).collect();
            self.note(&loc, Level::Warning, format!("{} not supported: tidegate speaks TLS 1.2 and 1.3 only", old.join(", ")));
        }
        if has("TLSv1.2") || !has("TLSv1.3") { Some(("1.2", loc)) } else { Some(("1.3", loc)) }
    }

    /// `trusted_proxies` from `set_real_ip_from` (and, with `accept_proxy`, everyone when
    /// nginx named nobody, as nginx accepts PROXY headers from any peer).
    fn trusted(&mut self, scopes: &[&Scope], accept_proxy: Option<&Loc>) -> (Vec<String>, String) {
        let mut out: Vec<String> = Vec::new();
        let mut locs: Vec<String> = Vec::new();
        for s in scopes {
            for (v, loc) in &s.real_ip_from {
                if v.parse::<Cidr>().is_err() {
                    self.note(loc, Level::Warning, format!("set_real_ip_from {v}: not an IP or CIDR tidegate understands; left out"));
                    continue;
                }
                if !out.contains(v) {
                    out.push(v.clone());
                    let at = self.at(loc);
                    if !locs.contains(&at) {
                        locs.push(at);
                    }
                }
            }
            if let Some((h, loc)) = &s.real_ip_header
                && !h.eq_ignore_ascii_case("x-forwarded-for")
                && !h.eq_ignore_ascii_case("proxy_protocol")
            {
                self.note(
                    loc,
                    Level::Warning,
                    format!("real_ip_header {h}: tidegate reads the client address from X-Forwarded-For (or the PROXY header)"),
                );
            }
        }
        if let Some(loc) = accept_proxy
            && out.is_empty()
        {
            self.note(loc, Level::Warning, "proxy_protocol: nginx accepted PROXY headers from any peer; tidegate needs trusted_proxies, so 0.0.0.0/0 and ::/0 are written: narrow them to your balancers");
            return (vec!["0.0.0.0/0".into(), "::/0".into()], format!("{} listen ... proxy_protocol", self.at(loc)));
        }
        let comment = if locs.is_empty() { String::new() } else { format!("{} set_real_ip_from", locs.join(", ")) };
        (out, comment)
    }
}

// =======================================================================================
// Converter: per-upstream settings from the locations, and the TOML text
// =======================================================================================

/// Settings that nginx sets per location and tidegate per upstream.
#[derive(Debug, Default)]
struct Settled {
    connect: Val<u64>,
    response_header: Val<u64>,
    tunnel_idle: Val<u64>,
    tries: Val<u64>,
    fail_on: Option<(Vec<u16>, Loc)>,
    send_proxy: Option<Loc>,
}

impl Cx {
    /// One value for an upstream from the values its locations set: the largest, with a
    /// warning when they differ.
    fn one_value(&mut self, up: usize, what: &str, values: Vec<(u64, Loc)>) -> Val<u64> {
        let mut distinct: Vec<u64> = values.iter().map(|v| v.0).collect();
        distinct.sort_unstable();
        distinct.dedup();
        let best = values.iter().max_by_key(|v| v.0)?.clone();
        if distinct.len() > 1 {
            let list: Vec<String> = values.iter().map(|(v, l)| format!("{} at {}", fmt_ms(*v), self.at(l))).collect();
            let (name, loc) = (self.ups[up].name.clone(), self.ups[up].loc.clone());
            self.note(
                &loc,
                Level::Warning,
                format!("locations using upstream \"{name}\" set different {what} ({}); tidegate has one per upstream: the largest, {}, is used", list.join(", "), fmt_ms(best.0)),
            );
        }
        Some(best)
    }

    fn settle(&mut self, up: usize) -> Settled {
        let uses = self.ups[up].uses.clone();
        let connect = self.one_value(up, "proxy_connect_timeout", uses.iter().filter_map(|u| u.connect.clone()).collect());
        let mut s = Settled { connect, ..Settled::default() };
        for u in uses.iter().filter(|u| u.connect.as_ref().is_some_and(|c| c.0 == 0)) {
            self.note(&u.loc, Level::Warning, "proxy_connect_timeout 0 is not a usable timeout; left out");
        }
        if s.connect.as_ref().is_some_and(|c| c.0 == 0) {
            s.connect = None;
        }
        let http_reads: Vec<(u64, Loc)> = uses.iter().filter(|u| !u.ws && !u.stream).filter_map(|u| u.read.clone()).collect();
        s.response_header = self.one_value(up, "proxy_read_timeout", http_reads).filter(|v| v.0 > 0);
        let mut idle: Vec<(u64, Loc)> = Vec::new();
        for u in &uses {
            if u.ws {
                match [u.read.clone(), u.send.clone()].into_iter().flatten().max_by_key(|v| v.0) {
                    Some(v) => idle.push(v),
                    None => self.note(
                        &u.loc,
                        Level::Converted,
                        "WebSocket location without proxy_read_timeout: nginx closed idle WebSockets after 60s; tidegate's tunnel_idle default (1h) applies",
                    ),
                }
            } else if !u.stream && u.send.is_some() {
                let loc = u.send.as_ref().map(|v| v.1.clone()).unwrap_or_else(|| u.loc.clone());
                self.note(
                    &loc,
                    Level::Warning,
                    "proxy_send_timeout on a plain HTTP location: tidegate has no send timeout towards servers",
                );
            }
            if u.stream {
                match &u.stream_timeout {
                    Some(v) => idle.push(v.clone()),
                    None => self.note(
                        &u.loc,
                        Level::Converted,
                        "no proxy_timeout: nginx closed idle TCP connections after 10m; tidegate's tunnel_idle default (1h) applies",
                    ),
                }
            }
        }
        s.tunnel_idle = self
            .one_value(up, "WebSocket/TCP idle timeouts (proxy_read_timeout, proxy_send_timeout, proxy_timeout)", idle)
            .filter(|v| v.0 > 0);
        let mut tries: Vec<(u64, Loc)> = uses.iter().filter_map(|u| u.tries.clone()).collect();
        let mut statuses: Vec<u16> = Vec::new();
        let mut status_loc: Option<Loc> = None;
        for u in &uses {
            let Some((list, loc)) = &u.next_upstream else { continue };
            for v in list {
                match v.as_str() {
                    "error" | "timeout" => {}
                    "off" => {
                        if u.tries.is_none() {
                            tries.push((1, loc.clone()));
                        }
                        self.note(loc, Level::Converted, "proxy_next_upstream off -> tries = 1");
                    }
                    "http_500" | "http_502" | "http_503" | "http_504" => {
                        let code: u16 = v[5..].parse().unwrap_or(502);
                        if !statuses.contains(&code) {
                            statuses.push(code);
                        }
                        status_loc.get_or_insert_with(|| loc.clone());
                    }
                    other => self.note(loc, Level::Warning, format!("proxy_next_upstream {other}: not carried over (tidegate retries only failed connects and counts only connect errors, timeouts and listed 5xx statuses as failures)")),
                }
            }
        }
        if let Some(loc) = status_loc {
            statuses.sort_unstable();
            self.note(
                &loc,
                Level::Warning,
                "5xx statuses in proxy_next_upstream -> fail_on (they count towards max_fails); tidegate does not retry a request once it was sent, nginx retried it on the next server",
            );
            s.fail_on = Some((statuses, loc));
        }
        s.tries = self.one_value(up, "proxy_next_upstream_tries", tries);
        let with: Vec<&Use> = uses.iter().filter(|u| u.send_proxy.is_some()).collect();
        if let Some(first) = with.first() {
            s.send_proxy = first.send_proxy.clone();
            if with.len() < uses.len() {
                let (name, loc) = (self.ups[up].name.clone(), self.ups[up].loc.clone());
                self.note(
                    &loc,
                    Level::Warning,
                    format!(
                        "only some stream servers using \"{name}\" send the PROXY protocol; tidegate sends it on every connection to it"
                    ),
                );
            }
        }
        s
    }

    /// Drops listeners whose address another one already takes (http and stream on one
    /// port, two stream servers on one port), as tidegate refuses overlapping binds.
    fn check_binds(&mut self) {
        let mut listeners = std::mem::take(&mut self.listeners);
        listeners.sort_by_key(|l| l.mode != "http");
        let mut kept: Vec<OutListener> = Vec::new();
        for l in listeners {
            let Ok(a) = l.bind.parse::<SocketAddr>() else { continue };
            let clash = kept.iter().find(|k| {
                k.bind.parse::<SocketAddr>().is_ok_and(|b| {
                    b.port() == a.port() && (b == a || (b.is_ipv4() == a.is_ipv4() && (b.ip().is_unspecified() || a.ip().is_unspecified())))
                })
            });
            if let Some(k) = clash {
                let msg = format!(
                    "{} is already taken by the listener from {}; tidegate needs one listener per address: left out",
                    l.bind,
                    self.at(&k.loc)
                );
                let loc = l.loc.clone();
                self.note(&loc, Level::Unsupported, msg);
                continue;
            }
            kept.push(l);
        }
        if kept.is_empty() {
            let loc = Loc { file: Arc::from(self.main_file.as_path()), line: 1 };
            self.note(
                &loc,
                Level::Unsupported,
                "nothing to listen on: no server block could be converted, so the output has no [[listener]]",
            );
        }
        self.listeners = kept;
    }

    fn finish(mut self) -> Import {
        self.check_binds();
        let settled: Vec<Settled> = (0..self.ups.len()).map(|i| self.settle(i)).collect();
        let toml = self.render(&settled);
        let mut notes = std::mem::take(&mut self.notes);
        let main = self.shown(&self.main_file);
        notes.sort_by(|a, b| (a.file != main, &a.file, a.line).cmp(&(b.file != main, &b.file, b.line)));
        let mut skipped = self.skipped;
        skipped.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
        Import { toml, notes, skipped }
    }

    fn render(&mut self, settled: &[Settled]) -> String {
        let mut t = String::new();
        let main = self.shown(&self.main_file);
        let _ = writeln!(t, "# tidegate configuration converted from {} by `tidegate import-nginx`.", main.display());
        let _ = writeln!(t, "# Every item names the nginx line it came from. Check it with `tidegate check -c FILE`.");
        let mut problems: Vec<&Note> = self.notes.iter().filter(|n| n.level != Level::Converted).collect();
        problems.sort_by(|a, b| (a.file != main, &a.file, a.line).cmp(&(b.file != main, &b.file, b.line)));
        if !problems.is_empty() {
            let _ = writeln!(t, "#\n# Not carried over, or carried over with a difference:");
            for n in problems {
                let _ = writeln!(t, "#   {n}");
            }
        }
        t.push('\n');
        if let Some((ms, loc)) = &self.shutdown_timeout {
            let _ = writeln!(t, "shutdown_timeout = {}  # {} worker_shutdown_timeout\n", toml_str(&fmt_ms(*ms)), self.at(loc));
        }
        let mut listeners = std::mem::take(&mut self.listeners);
        let mut names: BTreeSet<String> = BTreeSet::new();
        for l in &mut listeners {
            let mut name = l.name.clone();
            let mut n = 2;
            while !names.insert(name.clone()) {
                name = format!("{}-{n}", l.name);
                n += 1;
            }
            l.name = name;
        }
        for l in &listeners {
            self.render_listener(&mut t, l);
        }
        for (i, settled) in settled.iter().enumerate() {
            if self.ups[i].dead.is_none() {
                self.render_upstream(&mut t, i, settled);
            }
        }
        t
    }

    fn render_listener(&self, t: &mut String, l: &OutListener) {
        let _ = writeln!(t, "[[listener]]  # {}", l.comment);
        let _ = writeln!(t, "name = {}", toml_str(&l.name));
        let _ = writeln!(t, "bind = {}", toml_str(&l.bind));
        if l.mode != "http" {
            let _ = writeln!(t, "mode = {}", toml_str(l.mode));
        }
        if let Some(u) = l.upstream {
            let _ = writeln!(t, "upstream = {}", toml_str(&self.ups[u].name));
        }
        if let Some(loc) = &l.accept_proxy {
            let _ = writeln!(t, "accept_proxy = true  # {} listen ... proxy_protocol", self.at(loc));
        }
        if !l.trusted.is_empty() {
            let list: Vec<String> = l.trusted.iter().map(|s| toml_str(s)).collect();
            let _ = writeln!(t, "trusted_proxies = [{}]  # {}", list.join(", "), l.trusted_comment);
        }
        if let Some((allow, loc)) = &l.underscores {
            let v = if *allow { "allow" } else { "drop" };
            let _ = writeln!(t, "header_underscores = {}  # {} underscores_in_headers", toml_str(v), self.at(loc));
        }
        if l.keepalive_idle.is_some() || l.header_read.is_some() || l.body_timeout.is_some() || l.send_timeout.is_some() {
            let _ = writeln!(t, "\n  [listener.timeouts]");
            if let Some((ms, loc)) = &l.header_read {
                let _ = writeln!(t, "  header_read = {}  # {} client_header_timeout", toml_str(&fmt_ms(*ms)), self.at(loc));
            }
            if let Some((ms, loc)) = &l.keepalive_idle {
                let _ = writeln!(t, "  keepalive_idle = {}  # {} keepalive_timeout", toml_str(&fmt_ms(*ms)), self.at(loc));
            }
            if let Some((ms, loc)) = &l.body_timeout {
                let _ = writeln!(t, "  body = {}  # {} client_body_timeout", toml_str(&fmt_ms(*ms)), self.at(loc));
                let _ = writeln!(t, "  body_min_rate = 0  # nginx only times out a body that stops (no minimum rate)");
            }
            if let Some((ms, loc)) = &l.send_timeout {
                let _ = writeln!(t, "  send = {}  # {} send_timeout", toml_str(&fmt_ms(*ms)), self.at(loc));
            }
        }
        if !l.certs.is_empty() {
            let _ = writeln!(t, "\n  [listener.tls]");
            let _ = writeln!(t, "  certificates = [");
            for (cert, key, default, loc) in &l.certs {
                let d = if *default { ", default = true" } else { "" };
                let _ = writeln!(t, "    {{ cert = {}, key = {}{d} }},  # {} ssl_certificate", toml_str(cert), toml_str(key), self.at(loc));
            }
            let _ = writeln!(t, "  ]");
            if let Some((v, loc)) = &l.min_version {
                let _ = writeln!(t, "  min_version = {}  # {} ssl_protocols", toml_str(v), self.at(loc));
            }
            if l.no_alpn {
                let _ = writeln!(t, "  alpn = []  # a TCP listener: offer no ALPN protocol (nginx's stream module offers none)");
            }
        }
        for r in &l.routes {
            let _ = writeln!(t, "\n  [[listener.route]]  # {}", r.comment);
            if let Some(h) = &r.host {
                let _ = writeln!(t, "  host = {}", toml_str(h));
            }
            if let Some(s) = &r.sni {
                let _ = writeln!(t, "  sni = {}", toml_str(s));
            }
            if let Some(p) = &r.prefix {
                let _ = writeln!(t, "  path_prefix = {}", toml_str(p));
            }
            let _ = writeln!(t, "  upstream = {}", toml_str(&self.ups[r.upstream].name));
        }
        t.push('\n');
    }

    fn render_upstream(&self, t: &mut String, i: usize, s: &Settled) {
        let up = &self.ups[i];
        let table = format!("upstream.{}", toml_key(&up.name));
        let _ = writeln!(t, "[{table}]  # {} {}", self.at(&up.loc), up.label);
        let mloc = up.method_loc.as_ref().map(|l| format!("  # {}", self.at(l))).unwrap_or_default();
        let sloc = up.sticky.as_ref().and_then(|c| c.loc.as_ref()).map(|l| format!("  # {}", self.at(l))).unwrap_or_default();
        let fallback = match up.method {
            Method::LeastConn => "least_conn",
            Method::RandomTwo => "p2c",
            Method::RoundRobin | Method::Random => "round_robin",
            Method::IpHash | Method::Hash { .. } => "least_conn",
        };
        match (&up.sticky, &up.method) {
            (Some(_), _) => {
                let _ = writeln!(t, "balance = \"cookie\"{sloc}");
            }
            (None, Method::RoundRobin) => {}
            (None, Method::Random) => {
                let _ = writeln!(t, "balance = \"round_robin\"{mloc} random");
            }
            (None, Method::LeastConn) => {
                let _ = writeln!(t, "balance = \"least_conn\"{mloc}");
            }
            (None, Method::RandomTwo) => {
                let _ = writeln!(t, "balance = \"p2c\"{mloc}");
            }
            (None, Method::IpHash) => {
                let _ = writeln!(t, "balance = \"ip_hash\"{mloc}");
                let _ = writeln!(t, "ip_hash = {{ mode = \"nginx\" }}");
            }
            (None, Method::Hash { .. }) => {
                let _ = writeln!(t, "balance = \"hash\"{mloc}");
            }
        }
        if let Some((k, loc)) = &up.keepalive {
            let _ = writeln!(t, "keepalive = {k}  # {}", self.at(loc));
        }
        if let Some((n, loc)) = &s.tries {
            let _ = writeln!(t, "tries = {n}  # {} proxy_next_upstream_tries", self.at(loc));
        }
        if let Some((codes, loc)) = &s.fail_on {
            let list: Vec<String> = codes.iter().map(u16::to_string).collect();
            let _ = writeln!(t, "fail_on = [\"connect\", \"timeout\", {}]  # {} proxy_next_upstream", list.join(", "), self.at(loc));
        }
        if let Some(loc) = &s.send_proxy {
            let _ = writeln!(t, "send_proxy = \"v1\"  # {} proxy_protocol on", self.at(loc));
        }
        let _ = writeln!(t, "servers = [");
        for srv in &up.servers {
            let mut fields = vec![format!("addr = {}", toml_str(&srv.addr))];
            if srv.weight != 1 {
                fields.push(format!("weight = {}", srv.weight));
            }
            if let Some(m) = srv.max_fails {
                fields.push(format!("max_fails = {m}"));
            }
            if let Some(ms) = srv.fail_timeout {
                fields.push(format!("fail_timeout = {}", toml_str(&fmt_ms(ms))));
            }
            if srv.backup {
                fields.push("backup = true".into());
            }
            if srv.down {
                fields.push("down = true".into());
            }
            if let Some(m) = srv.max_conns {
                fields.push(format!("max_conns = {m}"));
            }
            let _ = writeln!(t, "  {{ {} }},  # {}", fields.join(", "), self.at(&srv.loc));
        }
        let _ = writeln!(t, "]");
        if let (None, Method::Hash { key, consistent }) = (&up.sticky, &up.method) {
            let _ = writeln!(t, "\n  [{table}.hash]");
            let _ = writeln!(t, "  key = {}{mloc}", toml_str(key));
            let why = if *consistent { "off, as nginx's `hash ... consistent`" } else { "off: nginx's hash has no load bound" };
            let _ = writeln!(t, "  bounded_load = 0.0  # {why}");
        }
        if let Some(c) = &up.sticky {
            let _ = writeln!(t, "\n  [{table}.cookie]");
            if let Some(n) = &c.name {
                let _ = writeln!(t, "  name = {}", toml_str(n));
            }
            if let Some(v) = &c.secret {
                let _ = writeln!(t, "  secret = {}", toml_str(v));
            }
            if let Some(v) = &c.max_age {
                let _ = writeln!(t, "  max_age = {}", toml_str(v));
            }
            if let Some(v) = &c.path {
                let _ = writeln!(t, "  path = {}", toml_str(v));
            }
            if let Some(v) = &c.domain {
                let _ = writeln!(t, "  domain = {}", toml_str(v));
            }
            if let Some(v) = c.same_site {
                let _ = writeln!(t, "  same_site = {}", toml_str(v));
            }
            let _ = writeln!(t, "  fallback = {}  # nginx's balancing for clients without the cookie", toml_str(fallback));
        }
        if s.connect.is_some() || s.response_header.is_some() || s.tunnel_idle.is_some() {
            let _ = writeln!(t, "\n  [{table}.timeouts]");
            if let Some((ms, loc)) = &s.connect {
                let _ = writeln!(t, "  connect = {}  # {} proxy_connect_timeout", toml_str(&fmt_ms(*ms)), self.at(loc));
            }
            if let Some((ms, loc)) = &s.response_header {
                let _ = writeln!(t, "  response_header = {}  # {} proxy_read_timeout", toml_str(&fmt_ms(*ms)), self.at(loc));
            }
            if let Some((ms, loc)) = &s.tunnel_idle {
                let what = if up.stream { "proxy_timeout" } else { "proxy_read_timeout/proxy_send_timeout on a WebSocket location" };
                let _ = writeln!(t, "  tunnel_idle = {}  # {} {what}", toml_str(&fmt_ms(*ms)), self.at(loc));
            }
        }
        if let Some(h) = &up.health {
            let _ = writeln!(t, "\n  [{table}.health]  # {} check", self.at(&h.loc));
            let _ = writeln!(t, "  kind = {}", toml_str(h.kind));
            if let Some(p) = &h.path {
                let _ = writeln!(t, "  path = {}", toml_str(p));
            }
            if let Some(host) = &h.host {
                let _ = writeln!(t, "  host = {}", toml_str(host));
            }
            if let Some(codes) = &h.expect {
                let _ = writeln!(t, "  expect = [");
                for chunk in codes.chunks(20) {
                    let list: Vec<String> = chunk.iter().map(u16::to_string).collect();
                    let _ = writeln!(t, "    {},", list.join(", "));
                }
                let _ = writeln!(t, "  ]");
            }
            let _ = writeln!(t, "  interval = {}", toml_str(&fmt_ms(h.interval)));
            let _ = writeln!(t, "  timeout = {}", toml_str(&fmt_ms(h.timeout)));
            let _ = writeln!(t, "  rise = {}", h.rise);
            let _ = writeln!(t, "  fall = {}", h.fall);
            if h.start_healthy {
                let _ = writeln!(t, "  start_healthy = true  # default_down=false");
            }
        }
        if let Some(tls) = &up.tls {
            let _ = writeln!(t, "\n  [{table}.tls]  # {} https:// upstream", self.at(&tls.loc));
            let _ = writeln!(t, "  enabled = true");
            if let Some(s) = &tls.sni {
                let _ = writeln!(t, "  sni = {}", toml_str(s));
            }
            if let Some(ca) = &tls.ca {
                let _ = writeln!(t, "  ca = {}", toml_str(ca));
            }
            if !tls.verify {
                let _ = writeln!(t, "  verify = false  # as nginx without proxy_ssl_verify on");
            }
        }
        t.push('\n');
    }
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A TOML key: bare when it can be, quoted otherwise (`127.0.0.1-9000` has dots).
fn toml_key(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') { s.to_string() } else { toml_str(s) }
}

/// nginx's time syntax (`30`, `10s`, `1m30s`, `500ms`, `1h 30m`, `2d`, `1w`, `1M`, `1y`;
/// a bare number is seconds) in milliseconds.
fn nginx_time_ms(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let mut i = 0;
    let mut total: u64 = 0;
    let mut any = false;
    while i < b.len() {
        if b[i] == b' ' {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return None;
        }
        let n: u64 = s.get(start..i)?.parse().ok()?;
        let mult: u64 = if b.get(i) == Some(&b'm') && b.get(i + 1) == Some(&b's') {
            i += 2;
            1
        } else {
            let m = match b.get(i) {
                None | Some(b' ') => 1000,
                Some(b's') => 1000,
                Some(b'm') => 60_000,
                Some(b'h') => 3_600_000,
                Some(b'd') => 86_400_000,
                Some(b'w') => 7 * 86_400_000,
                Some(b'M') => 30 * 86_400_000,
                Some(b'y') => 365 * 86_400_000,
                Some(_) => return None,
            };
            if b.get(i).is_some_and(|&c| c != b' ') {
                i += 1;
            }
            m
        };
        total = total.checked_add(n.checked_mul(mult)?)?;
        any = true;
    }
    any.then_some(total)
}

/// Milliseconds as a tidegate duration, in the largest unit that is exact.
fn fmt_ms(ms: u64) -> String {
    const UNITS: [(u64, &str); 4] = [(86_400_000, "d"), (3_600_000, "h"), (60_000, "m"), (1000, "s")];
    for (size, unit) in UNITS {
        if ms >= size && ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str) -> Vec<(String, Vec<String>)> {
        parse(text, Path::new("t.conf"))
            .unwrap_or_else(|e| panic!("{e}"))
            .into_iter()
            .map(|d| (d.name, d.args.into_iter().map(|a| a.value).collect()))
            .collect()
    }

    fn err(text: &str) -> (usize, String) {
        let e = parse(text, Path::new("t.conf")).expect_err(text);
        (e.line, e.message)
    }

    /// Imports `text` (no includes) and validates the result.
    fn convert(text: &str) -> (Import, crate::config::Config) {
        let imp = import_str(text, Path::new("/etc/nginx/nginx.conf"), &MemFs::new()).unwrap_or_else(|e| panic!("{e}"));
        let cfg = crate::config::load_str(&imp.toml, Path::new("/tmp/out.toml"))
            .unwrap_or_else(|e| panic!("output does not validate:\n{e}\n---\n{}", imp.toml));
        (imp, cfg)
    }

    fn has(imp: &Import, level: Level, line: usize, needle: &str) -> bool {
        imp.notes.iter().any(|n| n.level == level && n.line == line && n.message.contains(needle))
    }

    fn http(body: &str) -> String {
        format!("events {{}}\nhttp {{\n{body}\n}}\n")
    }

    #[test]
    fn tokens_quotes_escapes_comments() {
        let d = words("a \"b c\" 'd\\'e' f\\ g \"t\\tn\\n\\\"q\\\\\" \\x; # comment ; {\nb ${var}x ${a}b c#d x};\n");
        assert_eq!(d[0].0, "a");
        assert_eq!(d[0].1, ["b c", "d'e", "f\\ g", "t\tn\n\"q\\", "\\x"]);
        assert_eq!(d[1], ("b".to_string(), vec!["${var}x".to_string(), "${a}b".into(), "c#d".into(), "x}".into()]));
        let parsed = parse("x '';\n", Path::new("t")).unwrap();
        assert!(parsed[0].args[0].quoted && parsed[0].args[0].value.is_empty());
        // `if ($a = "b")`: a quote may be followed by `)`.
        assert_eq!(words("if ($a = \"b\") { }")[0].1, ["($a", "=", "b", ")"]);
        // Lines are counted through quoted newlines and comments.
        let ds = parse("# one\na \"x\ny\";\n\nb;\n", Path::new("t")).unwrap();
        assert_eq!((ds[0].line, ds[1].line), (2, 5));
    }

    #[test]
    fn blocks_nest() {
        let ds = parse("http { server { listen 80; location / { proxy_pass http://x; } } }", Path::new("t")).unwrap();
        let server = &ds[0].children()[0];
        assert_eq!(server.name, "server");
        assert_eq!(server.children()[1].children()[0].arg(0), Some("http://x"));
    }

    #[test]
    fn lua_blocks_are_skipped() {
        let ds = parse(
            "location / {\n content_by_lua_block {\n  local s = \"}\" -- }\n  local t = [[ { ]]\n  if x then ngx.say('{') end\n }\n}\nnext;\n",
            Path::new("t"),
        )
        .unwrap();
        assert_eq!(ds.len(), 2);
        assert_eq!(ds[1].name, "next");
        assert_eq!(ds[1].line, 8);
    }

    #[test]
    fn syntax_errors_are_located() {
        let (line, msg) = err("http {\n  server {\n    listen 80;\n  }\n");
        assert_eq!(line, 5, "{msg}");
        assert!(msg.contains("\"http\" block opened on line 1 is not closed"), "{msg}");
        let (line, msg) = err("http {\n}\n}\n");
        assert_eq!(line, 3);
        assert!(msg.contains("unexpected \"}\""), "{msg}");
        let (line, msg) = err("upstream a {\n  keepalive 32\n}\n");
        assert_eq!(line, 3);
        assert!(msg.contains("missing \";\" after directive \"keepalive\" (line 2)"), "{msg}");
        let (line, msg) = err("upstream a {\n  server 10.0.0.1:80\n  server 10.0.0.2:80;\n}\n");
        assert_eq!(line, 2);
        assert!(msg.contains("missing \";\" at the end of line 2"), "{msg}");
        let (line, msg) = err("a;\nb \"open\n\n;\n");
        assert_eq!(line, 2);
        assert!(msg.contains("unterminated quoted string"), "{msg}");
        let (line, msg) = err("x;\nkeepalive 1");
        assert_eq!(line, 2);
        assert!(msg.contains("unexpected end of file"), "{msg}");
        assert_eq!(err(";").0, 1);
        assert_eq!(err("\n{").0, 2);
        let (line, msg) = err("a \"b\"c;");
        assert_eq!(line, 1);
        assert!(msg.contains("after a quoted string"), "{msg}");
        let deep = "a {".repeat(MAX_DEPTH + 1);
        assert!(err(&deep).1.contains("nested"));
    }

    #[test]
    fn includes_glob_relative_to_the_conf_prefix() {
        let fs = MemFs::new()
            .with("/etc/nginx/conf.d/b.conf", "upstream b { server 10.0.0.2:80; }\n")
            .with("/etc/nginx/conf.d/a.conf", "upstream a { include snippets/servers.conf; }\n")
            .with("/etc/nginx/conf.d/.hidden.conf", "broken {\n")
            .with("/etc/nginx/conf.d/notes.txt", "broken {\n")
            .with("/etc/nginx/snippets/servers.conf", "server 10.0.0.1:80;\n")
            .with("/etc/nginx/sites/x/site.conf", "server { listen 8080; location / { proxy_pass http://a; } }\n")
            .with("/etc/nginx/sites/y/other.conf", "broken {\n");
        let main = "events {}\nhttp {\n  include conf.d/*.conf;\n  include /etc/nginx/sites/*/site.conf;\n  include missing/*.conf;\n}\n";
        let imp = import_str(main, Path::new("/etc/nginx/nginx.conf"), &fs).unwrap_or_else(|e| panic!("{e}"));
        let a = imp.toml.find("[upstream.a]").expect(&imp.toml);
        let b = imp.toml.find("[upstream.b]").expect(&imp.toml);
        assert!(a < b, "glob order is sorted:\n{}", imp.toml);
        assert!(imp.toml.contains("{ addr = \"10.0.0.1:80\" },  # snippets/servers.conf:1"), "{}", imp.toml);
        assert!(imp.toml.contains("# sites/x/site.conf:1 (server)"), "{}", imp.toml);
        assert!(has(&imp, Level::Warning, 5, "matches no file"), "{:#?}", imp.notes);

        // A missing plain include is an error at the include's file and line.
        let fs = MemFs::new().with("/etc/nginx/conf.d/a.conf", "# a\n\ninclude nope.conf;\n");
        let e = import_str("http {\ninclude conf.d/a.conf;\n}\n", Path::new("/etc/nginx/nginx.conf"), &fs).unwrap_err();
        assert_eq!((e.file.as_path(), e.line), (Path::new("/etc/nginx/conf.d/a.conf"), 3), "{e}");
        assert!(e.message.contains("nope.conf"), "{e}");
        // A syntax error inside an included file names that file.
        let fs = MemFs::new().with("/etc/nginx/bad.conf", "ok;\nupstream x {\n");
        let e = import_str("include bad.conf;\n", Path::new("/etc/nginx/nginx.conf"), &fs).unwrap_err();
        assert_eq!(e.file, Path::new("/etc/nginx/bad.conf"));
        assert_eq!(e.line, 3);
        // Self-inclusion stops.
        let fs = MemFs::new().with("/etc/nginx/loop.conf", "include loop.conf;\n");
        let e = import_str("include loop.conf;\n", Path::new("/etc/nginx/nginx.conf"), &fs).unwrap_err();
        assert!(e.message.contains("nested more than"), "{e}");
        // mime.types is optional.
        let imp = import_str("http { include mime.types; }", Path::new("/etc/nginx/nginx.conf"), &MemFs::new()).unwrap();
        assert!(has(&imp, Level::Warning, 1, "mime.types"));
        // A closure file system reads plain includes; its globs report that they cannot list.
        let read = |p: &Path| -> io::Result<String> {
            if p == Path::new("/x/inc.conf") {
                Ok("upstream u { server 10.0.0.1:80; }".into())
            } else {
                Err(io::ErrorKind::NotFound.into())
            }
        };
        let imp = import_str("http { include inc.conf; include d/*.conf; }", Path::new("/x/nginx.conf"), &read).unwrap();
        assert!(imp.toml.contains("[upstream.u]"));
        assert!(has(&imp, Level::Warning, 1, "cannot list"), "{:#?}", imp.notes);
    }

    #[test]
    fn wildcards() {
        for (p, n, ok) in [
            ("*.conf", "a.conf", true),
            ("*.conf", "a.confx", false),
            ("a?c", "abc", true),
            ("[ab]*", "bee", true),
            ("[!ab]*", "bee", false),
            ("[a-c]x", "bx", true),
            ("*", "", true),
            ("*a*b", "xxaYYb", true),
            ("[", "[", true),
            ("x[", "x", false),
        ] {
            assert_eq!(wildcard_match(p, n), ok, "{p} vs {n}");
        }
    }

    #[test]
    fn times() {
        assert_eq!(nginx_time_ms("30"), Some(30_000));
        assert_eq!(nginx_time_ms("10s"), Some(10_000));
        assert_eq!(nginx_time_ms("500ms"), Some(500));
        assert_eq!(nginx_time_ms("1m30s"), Some(90_000));
        assert_eq!(nginx_time_ms("1h 30m"), Some(5_400_000));
        assert_eq!(nginx_time_ms("7d"), Some(604_800_000));
        assert_eq!(nginx_time_ms("1y"), Some(365 * 86_400_000));
        assert_eq!(nginx_time_ms("x"), None);
        assert_eq!(nginx_time_ms(""), None);
        assert_eq!(nginx_time_ms("99999999999999999999999y"), None);
        assert_eq!(fmt_ms(3_600_000), "1h");
        assert_eq!(fmt_ms(90_000), "90s");
        assert_eq!(fmt_ms(1500), "1500ms");
        assert_eq!(fmt_ms(0), "0ms");
        for ms in [1, 999, 1000, 61_000, 86_400_000, 90_061_001] {
            assert_eq!(crate::config::parse_duration(&fmt_ms(ms)).unwrap().as_millis() as u64, ms);
        }
    }

    #[test]
    fn hash_keys() {
        let k = |raw: &str| hash_key(raw, false).map(|(k, c)| (k, c.is_some()));
        assert_eq!(k("$remote_addr"), Ok(("ip".into(), false)));
        assert_eq!(k("$binary_remote_addr"), Ok(("ip".into(), true)));
        assert_eq!(k("$cookie_session"), Ok(("cookie:session".into(), false)));
        assert_eq!(k("$http_x_user_id"), Ok(("header:X-User-Id".into(), false)));
        assert_eq!(k("${arg_user}"), Ok(("query:user".into(), false)));
        assert_eq!(k("$request_uri"), Ok(("path".into(), true)));
        assert_eq!(k("$uri"), Ok(("path".into(), true)));
        assert!(k("$host$request_uri").unwrap_err().contains("not a single variable"));
        assert!(k("$scheme").unwrap_err().contains("no tidegate equivalent"));
        assert!(hash_key("$cookie_x", true).unwrap_err().contains("TCP"));
        assert_eq!(hash_key("$remote_addr", true).unwrap().0, "ip");
    }

    #[test]
    fn addresses() {
        assert_eq!(server_addr("10.0.0.1:80", Some(80)), Ok(("10.0.0.1:80".into(), false)));
        assert_eq!(server_addr("10.0.0.1", Some(80)), Ok(("10.0.0.1:80".into(), true)));
        assert_eq!(server_addr("[::1]:9000", Some(80)), Ok(("[::1]:9000".into(), false)));
        assert_eq!(server_addr("[::1]", Some(80)), Ok(("[::1]:80".into(), true)));
        assert_eq!(server_addr("app.internal:8080", Some(80)), Ok(("app.internal:8080".into(), true)));
        assert!(server_addr("10.0.0.1", None).is_err());
        assert!(server_addr("a b:1", Some(80)).is_err());
        assert!(server_addr("10.0.0.1:0", Some(80)).is_err());
        assert_eq!(listen_addr("80").unwrap().0, "0.0.0.0:80".parse().unwrap());
        assert_eq!(listen_addr("*:8080").unwrap().0, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(listen_addr("[::]:443").unwrap().0, "[::]:443".parse().unwrap());
        assert_eq!(listen_addr("127.0.0.1").unwrap().0, "127.0.0.1:80".parse().unwrap());
        assert!(listen_addr("localhost:81").unwrap().1.is_some());
        assert!(listen_addr("example.com:80").is_err());
    }

    #[test]
    fn variables_split() {
        assert_eq!(variables("a$b${c}d$"), [Part::Text("a".into()), Part::Var("b".into()), Part::Var("c".into()), Part::Text("d$".into())]);
        assert_eq!(single_var("${x}"), Some("x".into()));
        assert_eq!(single_var("$x$y"), None);
        assert!(!has_vars("${unclosed"));
    }

    #[test]
    fn upstream_parameters_and_methods() {
        let (imp, cfg) = convert(&http(
            "upstream a {\n  least_conn;\n  server 10.0.0.1:80 weight=3 max_fails=2 fail_timeout=30s max_conns=100;\n  server 10.0.0.2:80 backup;\n  server 10.0.0.3:80 down;\n  server 10.0.0.4:80 drain slow_start=30s route=x;\n  keepalive 8;\n  zone z 64k;\n}\nupstream b { ip_hash; server 10.0.0.1:80; server 10.0.0.2:80 weight=2; }\nupstream c { hash $arg_user consistent; server 10.0.0.1:80; server 10.0.0.2:80; }\nupstream d { random two least_conn; server 10.0.0.1:80; server 10.0.0.2:80; }\nupstream e { random; server 10.0.0.1:80; server 10.0.0.2:80; }\nupstream f { hash $http_x_user; server 10.0.0.1:80; server 10.0.0.2:80; }\nupstream g { hash $host$uri; server 10.0.0.1:80; }\nserver { listen 8080; location / { proxy_pass http://a; proxy_set_header Host $host; } }",
        ));
        use crate::config::{Balance, HashKey, IpHashMode};
        let a = cfg.upstream("a").unwrap();
        assert_eq!(a.balance, Balance::LeastConn);
        assert_eq!(a.keepalive, 8);
        let s = &a.servers[0];
        assert_eq!((s.weight.get(), s.max_fails, s.max_conns, s.fail_timeout.as_secs()), (3, 2, 100, 30));
        assert!(a.servers[1].backup && a.servers[2].down && a.servers[3].down);
        assert!(has(&imp, Level::Warning, 8, "`drain` becomes down = true"), "{:#?}", imp.notes);
        assert!(has(&imp, Level::Warning, 8, "slow_start"));
        assert!(has(&imp, Level::Warning, 8, "route=x ignored"));
        assert!(has(&imp, Level::Converted, 10, "zone"), "{:#?}", imp.notes);
        assert_eq!(cfg.upstream("b").unwrap().balance, Balance::IpHash(IpHashMode::Nginx));
        match &cfg.upstream("c").unwrap().balance {
            Balance::Hash(h) => assert_eq!((&h.key, h.bounded_load), (&HashKey::Query("user".into()), 0.0)),
            other => panic!("{other:?}"),
        }
        assert_eq!(cfg.upstream("d").unwrap().balance, Balance::P2c);
        assert_eq!(cfg.upstream("e").unwrap().balance, Balance::RoundRobin);
        assert!(has(&imp, Level::Warning, 15, "round_robin"), "{:#?}", imp.notes);
        match &cfg.upstream("f").unwrap().balance {
            Balance::Hash(h) => assert_eq!(h.key, HashKey::Header("x-user".into())),
            other => panic!("{other:?}"),
        }
        assert!(has(&imp, Level::Warning, 16, "tidegate hashes consistently"));
        assert_eq!(cfg.upstream("g").unwrap().balance, Balance::RoundRobin);
        assert!(has(&imp, Level::Unsupported, 17, "not a single variable"));
        assert!(!imp.complete());
    }

    #[test]
    fn sticky_dialects() {
        let (imp, cfg) = convert(&http(
            "upstream plus { server 10.0.0.1:80; server 10.0.0.2:80; sticky cookie srv_id expires=1h domain=.example.com path=/app httponly secure samesite=strict; }\nupstream ng { least_conn; sticky name=route_id expires=2h hash=sha1; server 10.0.0.1:80; server 10.0.0.2:80; }\nupstream route { sticky route $a $b; server 10.0.0.1:80; }\nserver { listen 8080; location / { proxy_pass http://plus; proxy_set_header Host $host; } }",
        ));
        use crate::config::{Balance, Fallback, SameSite};
        let Balance::Cookie(c) = &cfg.upstream("plus").unwrap().balance else { panic!() };
        assert_eq!(c.name, "srv_id");
        assert_eq!(c.max_age, Some(std::time::Duration::from_secs(3600)));
        assert_eq!((c.domain.as_deref(), c.path.as_str(), c.same_site), (Some("example.com"), "/app", SameSite::Strict));
        assert_eq!(c.fallback, Fallback::RoundRobin);
        let Balance::Cookie(c) = &cfg.upstream("ng").unwrap().balance else { panic!() };
        assert_eq!((c.name.as_str(), c.fallback), ("route_id", Fallback::LeastConn));
        assert!(has(&imp, Level::Unsupported, 5, "sticky route"), "{:#?}", imp.notes);
    }

    #[test]
    fn locations_hosts_and_default_server() {
        let (imp, cfg) = convert(&http(
            "upstream api { server 10.0.0.1:80; }\nupstream web { server 10.0.0.2:80; }\nupstream ws { server 10.0.0.3:80; }\n\
             server { listen 80; server_name web.example.com; location / { proxy_pass http://web; } location /static/ { root /srv; } }\n\
             server { listen 80 default_server; server_name api.example.com;\n  location /v1/ { proxy_pass http://api; }\n  location = /health { proxy_pass http://api; }\n  location /v1/ws { proxy_pass http://ws; proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection \"upgrade\"; proxy_read_timeout 1d; }\n  location ~ \\.php$ { return 403; }\n  location / { proxy_pass http://10.0.0.9:8080; }\n}\n\
             server { listen 80; server_name *.example.com; location / { proxy_pass http://web; } }",
        ));
        let l = &cfg.listeners[0];
        let routes: Vec<(Option<String>, Option<String>, String)> = l
            .routes
            .iter()
            .map(|r| {
                let host = r.host.as_ref().map(|h| match h {
                    crate::config::HostMatch::Exact(e) => e.clone(),
                    crate::config::HostMatch::Wildcard(w) => format!("*{w}"),
                });
                (host, r.path_prefix.clone(), cfg.upstreams[r.upstream].name.clone())
            })
            .collect();
        let s = |v: &str| Some(v.to_string());
        assert_eq!(
            routes,
            [
                (s("web.example.com"), None, "web".to_string()),
                (s("api.example.com"), s("/health"), "api".into()),
                (s("api.example.com"), s("/v1/ws"), "ws".into()),
                (s("api.example.com"), s("/v1/"), "api".into()),
                (s("api.example.com"), None, "10.0.0.9-8080".into()),
                (s("*.example.com"), None, "web".into()),
                (None, s("/health"), "api".into()),
                (None, s("/v1/ws"), "ws".into()),
                (None, s("/v1/"), "api".into()),
                (None, None, "10.0.0.9-8080".into()),
            ],
            "{}",
            imp.toml
        );
        assert_eq!(cfg.upstream("ws").unwrap().timeouts.tunnel_idle.as_secs(), 86_400);
        assert!(has(&imp, Level::Unsupported, 6, "does not proxy (serves files)"), "{:#?}", imp.notes);
        assert!(has(&imp, Level::Unsupported, 11, "regex location"), "{:#?}", imp.notes);
        assert!(has(&imp, Level::Warning, 9, "exact match"), "{:#?}", imp.notes);
        assert!(has(&imp, Level::Converted, 10, "WebSocket idiom"), "{:#?}", imp.notes);
    }

    #[test]
    fn uri_rewriting_and_variable_targets_are_unsupported() {
        let (imp, _) = convert(&http(
            "upstream a { server 10.0.0.1:80; }\nserver { listen 80;\n location /api/ { proxy_pass http://a/; }\n location /b/ { proxy_pass http://$x; }\n location / { proxy_pass http://a/; }\n}",
        ));
        assert!(has(&imp, Level::Unsupported, 5, "URI part"), "{:#?}", imp.notes);
        assert!(has(&imp, Level::Unsupported, 6, "variables"));
        assert!(imp.toml.contains("upstream = \"a\""));
    }

    #[test]
    fn tls_listener_and_upstream_tls() {
        let dir = std::env::temp_dir().join(format!("tidegate-nginx-unit-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let ck = rcgen::generate_simple_self_signed(vec!["a.example.com".to_string()]).unwrap();
        std::fs::write(dir.join("a.crt"), ck.cert.pem()).unwrap();
        std::fs::write(dir.join("a.key"), ck.signing_key.serialize_pem()).unwrap();
        let text = http(
            "ssl_protocols TLSv1 TLSv1.1 TLSv1.2;\nupstream a { server 10.0.0.1:443; }\nserver { listen 443 ssl; server_name a.example.com; ssl_certificate a.crt; ssl_certificate_key a.key;\n location / { proxy_pass https://a; proxy_ssl_verify off; proxy_set_header Host $host; } }",
        );
        let imp = import_str(&text, &dir.join("nginx.conf"), &MemFs::new()).unwrap();
        let cfg = crate::config::load_str(&imp.toml, &dir.join("out.toml")).unwrap_or_else(|e| panic!("{e}\n{}", imp.toml));
        let tls = cfg.listeners[0].tls.as_ref().unwrap();
        assert_eq!(tls.certificates.len(), 1);
        assert!(tls.certificates[0].default);
        assert_eq!(tls.min_version, crate::config::TlsVersion::V1_2);
        assert!(has(&imp, Level::Warning, 3, "TLSv1, TLSv1.1 not supported"), "{:#?}", imp.notes);
        let up = cfg.upstream("a").unwrap().tls.as_ref().unwrap();
        assert!(!up.verify);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn stream_tcp_and_passthrough() {
        let (imp, cfg) = convert(
            "stream {\n map $ssl_preread_server_name $b { hostnames; a.example.com up_a; *.example.com up_b; ~^x up_a; default up_b; }\n upstream up_a { server 10.0.0.1:443; }\n upstream up_b { hash $remote_addr consistent; server 10.0.0.2:443; server 10.0.0.3:443; }\n server { listen 443; ssl_preread on; proxy_pass $b; }\n server { listen 5000; proxy_pass 10.0.0.5:5000; proxy_protocol on; proxy_timeout 30s; }\n server { listen 53 udp; proxy_pass 10.0.0.6:53; }\n}\n",
        );
        use crate::config::ListenerMode;
        let tls = cfg.listeners.iter().find(|l| l.mode == ListenerMode::TlsPassthrough).unwrap();
        assert_eq!(tls.routes.len(), 3);
        assert!(tls.routes[2].sni.is_none());
        let tcp = cfg.listeners.iter().find(|l| l.mode == ListenerMode::Tcp).unwrap();
        let up = &cfg.upstreams[tcp.routes[0].upstream];
        assert_eq!(up.send_proxy, Some(crate::config::SendProxy::V1));
        assert_eq!(up.timeouts.tunnel_idle.as_secs(), 30);
        assert!(has(&imp, Level::Unsupported, 2, "regex SNI key"), "{:#?}", imp.notes);
        assert!(has(&imp, Level::Unsupported, 7, "UDP"), "{:#?}", imp.notes);
    }

    #[test]
    fn listener_settings() {
        let (imp, cfg) = convert(&http(
            "keepalive_timeout 65;\nclient_header_timeout 20s;\nclient_body_timeout 2m;\nsend_timeout 45s;\nunderscores_in_headers on;\nset_real_ip_from 10.0.0.0/8;\nreal_ip_header X-Forwarded-For;\nupstream a { server 10.0.0.1:80; }\nserver { listen 127.0.0.1:8080 proxy_protocol; location / { proxy_pass http://a; proxy_next_upstream error timeout http_502; proxy_next_upstream_tries 2; proxy_connect_timeout 3s; } }",
        ));
        let l = &cfg.listeners[0];
        assert_eq!(l.timeouts.keepalive_idle.as_secs(), 65);
        assert_eq!(l.timeouts.header_read.as_secs(), 20);
        assert_eq!((l.timeouts.body.as_secs(), l.timeouts.body_min_rate), (120, 0));
        assert_eq!(l.timeouts.send.as_secs(), 45);
        assert_eq!(l.header_underscores, crate::config::Underscores::Allow);
        assert!(l.accept_proxy);
        assert_eq!(l.trusted_proxies.len(), 1);
        let a = cfg.upstream("a").unwrap();
        assert_eq!((a.tries, a.timeouts.connect.as_secs()), (2, 3));
        assert_eq!(a.fail_on.statuses, [502]);
        assert!(imp.notes.iter().any(|n| n.message.contains("Host")), "{:#?}", imp.notes);
    }

    #[test]
    fn upstream_check_module() {
        let (_, cfg) = convert(&http(
            "upstream a { server 10.0.0.1:80; check interval=3000 rise=2 fall=5 timeout=1000 type=http; check_http_send \"GET /ping HTTP/1.0\\r\\nHost: svc\\r\\n\\r\\n\"; check_http_expect_alive http_2xx; }\nserver { listen 80; location / { proxy_pass http://a; } }",
        ));
        let h = cfg.upstream("a").unwrap().health.as_ref().unwrap();
        assert_eq!((h.path.as_str(), h.host.as_deref(), h.rise, h.fall), ("/ping", Some("svc"), 2, 5));
        assert_eq!((h.interval.as_millis(), h.timeout.as_millis()), (3000, 1000));
        assert!(h.expect.is_empty());
    }

    #[test]
    fn fixtures_convert_and_every_prefix_is_handled() {
        for (name, text) in [
            ("websocket.conf", include_str!("../../tests/fixtures/nginx/websocket.conf")),
            ("stream.conf", include_str!("../../tests/fixtures/nginx/stream.conf")),
            ("sticky-check.conf", include_str!("../../tests/fixtures/nginx/sticky-check.conf")),
            ("upstream-docs.conf", include_str!("../../tests/fixtures/nginx/upstream-docs.conf")),
        ] {
            let path = Path::new("/etc/nginx").join(name);
            let full = import_str(text, &path, &MemFs::new()).unwrap_or_else(|e| panic!("{e}"));
            assert!(toml::from_str::<toml::Table>(&full.toml).is_ok(), "{}", full.toml);
            for (i, _) in text.char_indices().step_by(7) {
                match import_str(&text[..i], &path, &MemFs::new()) {
                    Ok(imp) => assert!(toml::from_str::<toml::Table>(&imp.toml).is_ok(), "{name} prefix {i}:\n{}", imp.toml),
                    Err(e) => assert!(!e.message.is_empty()),
                }
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 3000, ..Default::default() })]
        /// Random sequences of nginx-ish words and punctuation: parse and convert without
        /// panicking, and any output is valid TOML.
        #[test]
        fn random_configs_never_panic(words in proptest::collection::vec(proptest::sample::select(VOCAB), 0..120)) {
            let text = words.join(" ");
            let fs = MemFs::new().with("/n/x.conf", "upstream x { server 10.0.0.9:80; }").with("/n/d/a.conf", "server { listen 81; location / { proxy_pass http://x; } }");
            if let Ok(imp) = import_str(&text, Path::new("/n/nginx.conf"), &fs) {
                proptest::prop_assert!(toml::from_str::<toml::Table>(&imp.toml).is_ok(), "{}\n{}", text, imp.toml);
                let _ = imp.report();
            }
        }
    }

    const VOCAB: &[&str] = &[
        "http",
        "stream",
        "events",
        "server",
        "upstream",
        "a",
        "x",
        "location",
        "if",
        "map",
        "listen",
        "80",
        "[::]:80",
        "127.0.0.1:8080",
        "443",
        "ssl",
        "default_server",
        "proxy_protocol",
        "udp",
        "server_name",
        "*.a.com",
        ".b.com",
        "c.com",
        "_",
        "~^r",
        "proxy_pass",
        "http://a",
        "http://x",
        "https://10.0.0.1:1/",
        "http://a/p",
        "$x",
        "10.0.0.1:80",
        "10.0.0.2",
        "[::1]:9",
        "unix:/s",
        "weight=2",
        "max_fails=0",
        "fail_timeout=0",
        "backup",
        "down",
        "drain",
        "max_conns=3",
        "ip_hash",
        "least_conn",
        "hash",
        "$remote_addr",
        "$arg_u",
        "$cookie_c",
        "$http_x_y",
        "$request_uri",
        "consistent",
        "random",
        "two",
        "sticky",
        "cookie",
        "name=n",
        "expires=max",
        "route",
        "check",
        "type=http",
        "interval=100",
        "timeout=9000",
        "check_http_send",
        "\"HEAD / HTTP/1.0\\r\\n\\r\\n\"",
        "check_http_expect_alive",
        "http_3xx",
        "keepalive",
        "zone",
        "{",
        "}",
        ";",
        ";",
        ";",
        "}",
        "{",
        "\"q\"",
        "'s'",
        "\\",
        "#c\n",
        "\n",
        "=",
        "^~",
        "~",
        "/",
        "/p",
        "/p/",
        "@n",
        "return",
        "301",
        "root",
        "ssl_certificate",
        "ssl_certificate_key",
        "c.pem",
        "ssl_protocols",
        "TLSv1.3",
        "proxy_set_header",
        "Upgrade",
        "$http_upgrade",
        "Connection",
        "upgrade",
        "Host",
        "$host",
        "proxy_read_timeout",
        "1h",
        "proxy_connect_timeout",
        "0",
        "proxy_timeout",
        "proxy_next_upstream",
        "off",
        "http_502",
        "proxy_next_upstream_tries",
        "3",
        "include",
        "x.conf",
        "d/*.conf",
        "nope.conf",
        "hostnames",
        "default",
        "$ssl_preread_server_name",
        "ssl_preread",
        "on",
        "set_real_ip_from",
        "10.0.0.0/8",
        "keepalive_timeout",
        "health_check",
        "content_by_lua_block",
        "worker_shutdown_timeout",
        "30s",
        "client_body_timeout",
        "underscores_in_headers",
    ];

    #[test]
    fn odd_inputs_do_not_panic() {
        for text in [
            "",
            "}",
            "{",
            "\\",
            "\"",
            "'",
            "a \\",
            "http { server { listen; location; location = { } proxy_pass; } }",
            "http { upstream { } upstream a b { } upstream c { server; server unix:/x; hash; random x; sticky; check type=; } }",
            "http { server { listen unix:/x; listen [::1; listen 99999; server_name ~x *.; location @x { proxy_pass http://a; } } }",
            "stream { server { listen 1; proxy_pass $x; } server { proxy_pass a; } map $a $b { } }",
            "http { map $a { } server { location / { proxy_pass https://[::1]:1/; proxy_pass http://:; } } }",
            "http { server { location / { proxy_pass http://a:99999; } } server { listen 80 ssl; location / { proxy_pass http://10.0.0.1; } } }",
            "stream { map $ssl_preread_server_name $x { hostnames; .a x.*; } server { listen 1; proxy_pass $x; } }",
            "content_by_lua_block { [=[ ",
            "x ${",
            "a $;",
        ] {
            if let Ok(imp) = import_str(text, Path::new("/n/nginx.conf"), &MemFs::new()) {
                assert!(toml::from_str::<toml::Table>(&imp.toml).is_ok(), "{text}\n{}", imp.toml);
                let _ = imp.report();
            }
        }
    }
}
