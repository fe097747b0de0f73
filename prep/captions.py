"""An edit image's instruction captions, by its dataset's `caption_strategy` (SimpleTuner's): the lines of
its `.txt` file (`textfile`), its file name (`filename`), the dataset's `instance_prompt`
(`instanceprompt`), or its rows in a JSONL or Parquet table (`parquet`: `CaptionTable`)."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from shared.config import DatasetConfig
from shared.parquet import read_parquet


class CaptionTable:
    """Captions from a JSONL or Parquet table: `filename_column` -> `caption_column` (str or list)."""

    def __init__(self, spec: dict, dataset_id: str):
        self.path = Path(spec.get("path", ""))
        filename_column = spec.get("filename_column", "filename")
        caption_column = spec.get("caption_column", "caption")
        if self.path.suffix.lower() == ".jsonl":
            lines = self.path.read_text(encoding="utf-8-sig").splitlines()
            rows = []
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"line {number} is not valid JSON ({err})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"line {number} is a JSON {type(row).__name__}, not an object with named fields")
                rows.append(row)
        else:
            rows = read_parquet(self.path).to_pylist()
        if rows and (filename_column not in rows[0] or caption_column not in rows[0]):
            raise ValueError(
                f"needs columns '{filename_column}' and '{caption_column}', has {sorted(rows[0])}; "
                f"set parquet.filename_column / parquet.caption_column of dataset '{dataset_id}'"
            )
        self.captions: dict[str, list[str]] = {}
        rows_per_name: dict[str, int] = {}
        for row in rows:
            value = row[caption_column]
            captions = value if isinstance(value, list) else [value]
            name = str(row[filename_column])
            rows_per_name[name] = rows_per_name.get(name, 0) + 1
            self.captions[name] = [str(c).strip() for c in captions if c and str(c).strip()]
        self.repeated = {name: n for name, n in rows_per_name.items() if n > 1}  # names with several rows

    def lookup(self, relpath: str) -> list[str]:
        """Captions of `relpath`, keyed in the table by the relative path, with or without extension, or name."""
        found = self.keys_for(relpath)
        return self.captions[found[0]] if found else []

    def keys_for(self, relpath: str) -> list[str]:
        """The table's names for `relpath`, most specific first (several: rows that name it twice)."""
        name = PurePosixPath(relpath).name
        keys = dict.fromkeys((relpath, str(PurePosixPath(relpath).with_suffix("")), name, PurePosixPath(name).stem))
        return [key for key in keys if key in self.captions]


def read_captions(
    main: DatasetConfig, image: Path, relpath: str, table: CaptionTable | None
) -> tuple[list[str], Path | None]:
    """(captions, the file they come from, if any) for one image by the dataset's `caption_strategy`."""
    if main.caption_strategy == "instanceprompt":
        return [main.instance_prompt.strip()], None
    if main.caption_strategy == "filename":
        return [image.stem.replace("_", " ").strip()], None
    if main.caption_strategy == "parquet":
        return (table.lookup(relpath) if table else []), Path(main.parquet.get("path", ""))
    text_file = image.with_suffix(".txt")
    if not text_file.is_file():
        return [], text_file
    try:
        lines = text_file.read_text(encoding="utf-8-sig").splitlines()  # BOM and CRLF handled
    except UnicodeDecodeError:
        return [], text_file
    return [line.strip() for line in lines if line.strip()], text_file
