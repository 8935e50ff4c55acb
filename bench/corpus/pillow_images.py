"""Image work with Pillow: thumbnails of large photos (transient peaks), per task.

- ``thumbnail``: decode a large JPEG, resize, re-encode (a transient peak of tens of MiB);
- ``watermark``: a small image with text drawn on it.
"""

from __future__ import annotations

import io

from corpus_common import make_app
from PIL import Image, ImageDraw, ImageFilter

app = make_app("pillow_images")


def _photo(width: int, height: int) -> bytes:
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    image = image.filter(ImageFilter.GaussianBlur(2))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    return out.getvalue()


PHOTO = _photo(4000, 3000)  # an upload, kept encoded as it came


@app.task
def thumbnail(size: int = 400) -> int:
    image = Image.open(io.BytesIO(PHOTO))
    image = image.convert("RGB").rotate(3, expand=True)
    image.thumbnail((size, size))
    out = io.BytesIO()
    image.save(out, "PNG")
    return len(out.getvalue())


@app.task
def watermark(text: str = "celery") -> int:
    image = Image.new("RGB", (800, 600), "white")
    ImageDraw.Draw(image).text((20, 20), text * 10, fill="black")
    out = io.BytesIO()
    image.save(out, "JPEG")
    return len(out.getvalue())
