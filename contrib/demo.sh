#!/bin/bash
# `make demo`: eight nights of backups of a sample home directory, then a walk
# through the history: `squashfu list`, the time-travel mount, and a roll-back.
# Everything lives in one scratch directory, and every mount is taken down on exit.
set -euo pipefail

DEMO=${SQUASHFU_DEMO_DIR:-/tmp/squashfu-demo}
SRC=$DEMO/home
ROOT=$DEMO/backup
VIEW=$DEMO/backups
RB=$DEMO/rollback

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

cleanup() {
    squashfu umount "$VIEW" 2>/dev/null || true
    squashfu umount "$RB" 2>/dev/null || true
    for m in "$VIEW" "$RB"; do mountpoint -q "$m" 2>/dev/null && umount -l "$m" || true; done
    rm -rf "$DEMO"
}
if [ "$(id -u)" != 0 ]; then
    echo "the demo mounts loop and overlay filesystems: run it as root (sudo make demo)" >&2
    exit 1
fi
cleanup
trap cleanup EXIT
mkdir -p "$SRC/alice/projects" "$SRC/bob" "$VIEW" "$RB"

say "a sample tree: $SRC"
echo "Dear diary, Sunday." > "$SRC/alice/diary.txt"
for i in $(seq 1 200); do echo "line $i of a report" >> "$SRC/alice/projects/report.txt"; done
head -c 2M /dev/urandom > "$SRC/bob/photo.raw"
ln -s ../alice/diary.txt "$SRC/bob/alices-diary"
run squashfu init "$ROOT" --source "$SRC" --exclude '*.cache'

say "eight nights of backups (SQUASHFU_NOW plays the clock)"
day() { date -d "2026-11-01 + $1 days" +%Y-%m-%dT02:30; }
for night in 0 1 2 3 4 5 6 7; do
    case $night in
        1) echo "Monday: the report is due Friday." >> "$SRC/alice/diary.txt" ;;
        2) echo "an extra paragraph" >> "$SRC/alice/projects/report.txt" ;;
        3) echo "Wednesday: I deleted Bob's photo by mistake." >> "$SRC/alice/diary.txt"
           rm "$SRC/bob/photo.raw" ;;
        4) mkdir -p "$SRC/bob/music" && echo "la la la" > "$SRC/bob/music/song.txt" ;;
        5) chmod 600 "$SRC/alice/diary.txt" ;;
        6) echo "cache" > "$SRC/bob/junk.cache" ;;
        7) echo "Sunday again: where is that photo?" >> "$SRC/alice/diary.txt" ;;
    esac
    printf '%s  ' "$(day $night)"
    SQUASHFU_NOW=$(day $night) squashfu -r "$ROOT" backup -v 2>&1 | tail -1
done

say "the history: the seed and one bin per night (past 14 bins, the oldest are merged into a new seed)"
run squashfu -r "$ROOT" list

say "the time-travel view"
run squashfu -r "$ROOT" mount "$VIEW"
run ls -l "$VIEW"
say "cd into two weekdays: Bob's photo was there on Tuesday and gone on Wednesday"
(cd "$VIEW/tue/bob" && run ls -l .)
(cd "$VIEW/wed/bob" && run ls -l .)
say "Alice's diary on Monday and today"
run cat "$VIEW/mon/alice/diary.txt"
run cat "$VIEW/latest/alice/diary.txt"
say "copy the lost photo back with plain cp"
run cp -a "$VIEW/tue/bob/photo.raw" "$SRC/bob/photo.raw"
run ls -l "$SRC/bob"
run squashfu umount "$VIEW"

say "the same day as a read-only kernel overlay (squashfu rollback)"
run squashfu -r "$ROOT" rollback tue "$RB"
run diff <(cat "$RB/alice/diary.txt") <(cat "$SRC/alice/diary.txt") || true
run squashfu umount "$RB"

say "nothing is left mounted under $DEMO"
if grep -F " $DEMO" /proc/self/mounts; then echo "a mount was left behind" >&2; exit 1; fi
echo "(none)"
