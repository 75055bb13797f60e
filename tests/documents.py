"""PDF and DOCX files made in the tests: real structure, bad input, bombs. No binaries committed.

PDFs are written object by object (the standard 14 fonts need no embedding), so a test can
say exactly what each page holds: lines of text in a font and size, an image, an outline.
DOCX files are zip archives of WordprocessingML with heading styles and tables.
"""

from __future__ import annotations

import io
import zipfile
import zlib
from dataclasses import dataclass, field

FONTS = {"F1": "Helvetica", "F2": "Helvetica-Bold", "F3": "Courier"}
BODY = ("F1", 11.0)
BOLD = ("F2", 11.0)
CODE = ("F3", 10.0)


@dataclass
class Text:
    """One line of text on a page."""

    text: str
    font: str = "F1"
    size: float = 11.0
    x: float = 72.0


@dataclass
class Page:
    lines: list[Text] = field(default_factory=list)
    image: bool = False  # a scanned page: one grey image, no text
    extra_ops: bytes = b""  # more content-stream operators (e.g. a slow page)


def ruled_table(
    rows: list[list[str]], top: float = 400.0, width: float = 150.0, height: float = 20.0
) -> bytes:
    """Content-stream operators for a table drawn with ruling lines, text in each cell."""
    columns = max(len(row) for row in rows)
    left, right, bottom = 72.0, 72.0 + columns * width, top - len(rows) * height
    ops = ["0.5 w"]
    for r in range(len(rows) + 1):
        y = top - r * height
        ops.append(f"{left:g} {y:g} m {right:g} {y:g} l S")
    for c in range(columns + 1):
        x = left + c * width
        ops.append(f"{x:g} {top:g} m {x:g} {bottom:g} l S")
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            x, y = left + c * width + 4, top - (r + 1) * height + 6
            ops.append(f"BT /F1 10 Tf {x:g} {y:g} Td ({_escape(cell)}) Tj ET")
    return ("\n" + "\n".join(ops)).encode("latin-1")


def heading(text: str, size: float) -> Text:
    return Text(text, "F2", size)


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def _content(page: Page) -> bytes:
    ops = []
    y = 740.0
    for line in page.lines:
        y -= line.size * 1.2
        ops.append(f"BT /{line.font} {line.size:g} Tf {line.x:g} {y:g} Td ({_escape(line.text)}) Tj ET")
        y -= line.size * 0.8  # a gap after every line: each is its own paragraph
    if page.image:
        ops.append("q 400 0 0 500 100 150 cm /Im1 Do Q")
    return "\n".join(ops).encode("latin-1") + page.extra_ops


def make_pdf(pages: list[Page], outline: list[tuple[int, str, int]] | None = None) -> bytes:
    """A PDF of these pages; `outline` entries are (level 1-3, title, 1-based page)."""
    objects: list[bytes] = []

    def add(body: bytes) -> int:
        objects.append(body)
        return len(objects)

    catalog = add(b"")  # filled in last
    pages_id = add(b"")
    font_ids = {
        name: add(f"<< /Type /Font /Subtype /Type1 /BaseFont /{base} /Encoding /WinAnsiEncoding >>".encode())
        for name, base in FONTS.items()
    }
    fonts = " ".join(f"/{name} {oid} 0 R" for name, oid in font_ids.items())
    image_data = bytes([128]) * (8 * 8)
    image_id = add(
        b"<< /Type /XObject /Subtype /Image /Width 8 /Height 8 /ColorSpace /DeviceGray "
        b"/BitsPerComponent 8 /Length %d >>\nstream\n" % len(image_data) + image_data + b"\nendstream"
    )
    page_ids = []
    for page in pages:
        data = zlib.compress(_content(page))
        content = add(b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(data) + data + b"\nendstream")
        page_ids.append(
            add(
                f"<< /Type /Page /Parent {pages_id} 0 R /MediaBox [0 0 612 792] /Contents {content} 0 R "
                f"/Resources << /Font << {fonts} >> /XObject << /Im1 {image_id} 0 R >> >> >>".encode()
            )
        )
    kids = " ".join(f"{pid} 0 R" for pid in page_ids)
    objects[pages_id - 1] = f"<< /Type /Pages /Kids [{kids}] /Count {len(page_ids)} >>".encode()
    outline_ref = ""
    if outline:
        outline_ref = f" /Outlines {_outline(outline, page_ids, add, objects)} 0 R"
    objects[catalog - 1] = f"<< /Type /Catalog /Pages {pages_id} 0 R{outline_ref} >>".encode()
    return serialize_pdf(objects, catalog)


def _outline(entries: list[tuple[int, str, int]], page_ids: list[int], add, objects) -> int:  # type: ignore[no-untyped-def]
    """Outline items, nested by level; returns the outline root's object number."""
    root = add(b"")
    ids = [add(b"") for _ in entries]
    parents: dict[int, int] = {}
    children: dict[int, list[int]] = {root: []}
    stack: list[tuple[int, int]] = [(0, root)]
    for (level, _, _), oid in zip(entries, ids, strict=True):
        while stack[-1][0] >= level:
            stack.pop()
        parent = stack[-1][1]
        parents[oid] = parent
        children.setdefault(parent, []).append(oid)
        children.setdefault(oid, [])
        stack.append((level, oid))
    for (_, title, page), oid in zip(entries, ids, strict=True):
        siblings = children[parents[oid]]
        index = siblings.index(oid)
        links = f"/Parent {parents[oid]} 0 R"
        if index > 0:
            links += f" /Prev {siblings[index - 1]} 0 R"
        if index + 1 < len(siblings):
            links += f" /Next {siblings[index + 1]} 0 R"
        if children[oid]:
            links += (
                f" /First {children[oid][0]} 0 R /Last {children[oid][-1]} 0 R /Count {len(children[oid])}"
            )
        objects[oid - 1] = (
            f"<< /Title ({_escape(title)}) {links} /Dest [{page_ids[page - 1]} 0 R /XYZ 0 792 0] >>".encode()
        )
    top = children[root]
    objects[root - 1] = (
        f"<< /Type /Outlines /First {top[0]} 0 R /Last {top[-1]} 0 R /Count {len(top)} >>".encode()
    )
    return root


def serialize_pdf(objects: list[bytes], root: int = 1) -> bytes:
    """A PDF file of these object bodies (object 1 up), with its cross-reference table."""
    out = io.BytesIO()
    out.write(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % number + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for offset in offsets:
        out.write(b"%010d 00000 n \n" % offset)
    out.write(
        b"trailer\n<< /Size %d /Root %d 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, root, xref)
    )
    return out.getvalue()


def encrypt_pdf(data: bytes, user_password: str) -> bytes:
    """The same PDF encrypted with AES-256 (pypdf's writer)."""
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(data)))
    writer.encrypt(user_password=user_password, owner_password="owner", algorithm="AES-256")
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


def slow_page(operations: int) -> Page:
    """A page whose content stream shows `operations` tiny strings: each costs the reader time."""
    ops = b"\n".join(
        b"BT /F1 4 Tf %d %d Td (x) Tj ET" % (10 + i % 590, 10 + (i // 590) % 780) for i in range(operations)
    )
    return Page(lines=[Text("A page of many glyphs")], extra_ops=b"\n" + ops)


# --- DOCX ------------------------------------------------------------------------------

W = 'xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"'
CONTENT_TYPES = (
    '<?xml version="1.0" encoding="UTF-8"?>'
    '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
    '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
    '<Default Extension="xml" ContentType="application/xml"/>'
    '<Override PartName="/word/document.xml" '
    'ContentType="application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/>'
    "</Types>"
)
RELS = (
    '<?xml version="1.0" encoding="UTF-8"?>'
    '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
    '<Relationship Id="rId1" '
    'Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument" '
    'Target="word/document.xml"/></Relationships>'
)


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def paragraph(text: str, style: str | None = None) -> str:
    """A `w:p`; style is a style id such as Heading1."""
    props = f'<w:pPr><w:pStyle w:val="{style}"/></w:pPr>' if style else ""
    return f'<w:p>{props}<w:r><w:t xml:space="preserve">{_xml(text)}</w:t></w:r></w:p>'


def table(rows: list[list[str]]) -> str:
    cells = "".join(
        "<w:tr>" + "".join(f"<w:tc>{paragraph(cell)}</w:tc>" for cell in row) + "</w:tr>" for row in rows
    )
    return f"<w:tbl>{cells}</w:tbl>"


def make_docx(body: list[str], extra: dict[str, bytes] | None = None) -> bytes:
    """A DOCX whose document body is these `w:p`/`w:tbl` elements (plus `extra` members)."""
    document = (
        f'<?xml version="1.0" encoding="UTF-8"?><w:document {W}><w:body>{"".join(body)}</w:body></w:document>'
    )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("[Content_Types].xml", CONTENT_TYPES)
        archive.writestr("_rels/.rels", RELS)
        archive.writestr("word/document.xml", document)
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return buffer.getvalue()


def understate_sizes(data: bytes, name: str, size: int) -> bytes:
    """The archive with `name`'s uncompressed size declared as `size` in both its headers.

    A zip bomb that lies about its size: the reader must not unpack more than declared.
    """
    raw = bytearray(data)
    encoded = name.encode()
    for signature, size_offset, name_offset in ((b"PK\x03\x04", 22, 30), (b"PK\x01\x02", 24, 46)):
        start = raw.find(signature)
        while start >= 0:
            if bytes(raw[start + name_offset : start + name_offset + len(encoded)]) == encoded:
                raw[start + size_offset : start + size_offset + 4] = size.to_bytes(4, "little")
            start = raw.find(signature, start + 4)
    return bytes(raw)
