// Roll-up captions (broadcast style): committed words only, so nothing on screen is ever
// retracted. The server's `caption.append` events are laid out as sent; a server without them
// gets rows built here from finals and the stable text of partials.

export const CAPTION_ROWS = 3;
export const CAPTION_WIDTH = 32;

/** A roll-up window: text fills the bottom row; a full row scrolls up; the top row drops off. */
export class RollUp {
  constructor(rows = CAPTION_ROWS, width = CAPTION_WIDTH) {
    this.rows = rows;
    this.width = width;
    this.lines = [""];
  }

  push(words) {
    for (const word of words) {
      for (let i = 0; i < word.length; i += this.width) {
        this.pushPiece(word.slice(i, i + this.width)); // a word longer than a row is cut
      }
    }
    this.lines = this.lines.slice(-this.rows);
  }

  /** A server `caption.append`: `text` as given (with its leading space), or a new row. */
  append(message) {
    const last = this.lines.length - 1;
    if (message.row_break && this.lines[last] !== "") this.lines.push(message.text);
    else this.lines[last] += message.text;
    this.lines = this.lines.slice(-(message.rows ?? this.rows));
  }

  pushPiece(piece) {
    const last = this.lines.length - 1;
    if (this.lines[last] === "") {
      this.lines[last] = piece;
    } else if (this.lines[last].length + 1 + piece.length <= this.width) {
      this.lines[last] += ` ${piece}`;
    } else {
      this.lines.push(piece);
    }
  }

  clear() {
    this.lines = [""];
  }

  text() {
    return this.lines.join("\n");
  }
}

function words(text) {
  return text.split(/\s+/).filter(Boolean);
}

const plain = (word) => word.toLowerCase().replace(/[^\p{L}\p{N}']/gu, "");

/**
 * How much of `final` the words already shown cover: the shortest prefix of `final` that
 * matches as many of them (in order, ignoring case and punctuation) as the whole final does.
 * A partial's "mister" against the final's "Mr." or a word the final drops does not repeat
 * the words around it.
 */
export function coveredPrefix(shown, final) {
  const a = shown.map(plain);
  const b = final.map(plain);
  let row = new Array(b.length + 1).fill(0); // longest common subsequence, a[..i] vs b[..j]
  for (const word of a) {
    const next = [0];
    for (let j = 1; j <= b.length; j++) {
      next[j] = word === b[j - 1] ? row[j - 1] + 1 : Math.max(row[j], next[j - 1]);
    }
    row = next;
  }
  return row.indexOf(row[b.length]);
}

/**
 * Committed text per segment: a partial's stable prefix only grows, and a final closes the
 * segment. Returns just the words not shown before, so each word is shown once.
 */
export class CommittedWords {
  constructor() {
    this.shown = new Map(); // "channel:segment" -> words shown so far
  }

  partial(message) {
    const key = segmentKey(message);
    const shown = this.shown.get(key) ?? [];
    const fresh = words(message.stable_text).slice(shown.length);
    this.shown.set(key, shown.concat(fresh));
    return fresh;
  }

  final(message) {
    const key = segmentKey(message);
    const shown = this.shown.get(key) ?? [];
    this.shown.delete(key);
    const all = words(message.text);
    return all.slice(coveredPrefix(shown, all));
  }
}

export function segmentKey(message) {
  return `${message.channel ?? 0}:${message.segment_id}`;
}
