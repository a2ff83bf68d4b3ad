# Sourced by the call scripts after lib.sh: the bench corpus, then both caches prepared from
# it in parallel, old main's ($W/old-cache, from .bench/old) and the split's ($W/new-cache);
# skipped when this warm machine has them already. Needs the carry .bench (corpus.py, old/).

if [[ ! -f "$W/new-cache/manifest.json" || ! -f "$W/old-cache/manifest.json" ]]; then
    log "bench corpus"
    python3 .bench/corpus.py "$W/corpus" --max-doc-chars 6000 --max-chars 1e9 > "$OUT/corpus.log" 2>&1
    tail -n 2 "$OUT/corpus.log"
    prep_old=$(rundir oldprep .bench/old 300)
    prep_new=$(rundir newprep . 300)
    prepare "$prep_old" "$W/old-cache" --source "$W/corpus" & old_pid=$!
    prepare "$prep_new" "$W/new-cache" --source "$W/corpus" & new_pid=$!
    wait "$old_pid"
    wait "$new_pid"
fi
