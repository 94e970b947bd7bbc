# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_vhost_user_blk_global_optspecs
    string join \n control-socket= control-socket-owner= control-socket-group= control-socket-mode= socket-path= fd= print-capabilities blk-file= null-size= read-only format= locking= incoming create= num-queues= queue-size= serial= logical-block-size= metadata-cache= poll-us= inject-faults= direct discard= detect-zeroes= cache= aio= journal-dir= no-journal writethrough socket-owner= socket-group= socket-mode= v/verbose h/help V/version
end

function __fish_vhost_user_blk_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_vhost_user_blk_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_vhost_user_blk_using_subcommand
    set -l cmd (__fish_vhost_user_blk_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c vhost-user-blk -n "__fish_vhost_user_blk_needs_command" -l control-socket -d 'Also serve a control socket (JSON lines: stats, flush, resize, bitmaps, activate, deactivate) at this path, owned by the daemon\'s user with mode 0600 unless --control-socket-owner/-group/-mode say otherwise. See docs/CONTROL.md' -r -F
complete -c vhost-user-blk -n "__fish_vhost_user_blk_needs_command" -l control-socket-owner -d 'Owner (user name or uid) of the control socket (needs privilege). Default: the daemon\'s user, whatever --socket-owner says: whoever can connect can resize the disk' -r
complete -c vhost-user-blk -n "__fish_vhost_user_blk_needs_command" -l control-socket-group -d 'Group (name or gid) of the control socket, e.g. a monitoring group together with --control-socket-mode 0660. Default: the daemon\'s group' -r
complete -c vhost-user-blk -n "__fish_vhost_user_blk_needs_command" -l control-socket-mode -d 'Permissions of the control socket, in octal' -r
complete -c vhost-user-blk -n "__fish_vhost_user_blk_needs_command" -l socket-path -d 'Listen for the VMM on this unix socket path (created with --socket-owner, --socket-group and --socket-mode)' -r -F
complete -c vhost-user-blk -n "__fish_vhost_user_blk_needs_command" -l fd -d 'Use this already-listening unix socket fd instead of --socket-path. Without either, a systemd socket-activation fd (LISTEN_FDS) is used' -r
complete -c vhost-user-blk -n "__fish_vhost_user_blk_needs_command" -l blk-file -d 'The disk image (regular file or block device) to serve' -r -F
complete -c vhost-user-blk -n "__fish_vhost_user_blk_needs_command" -l null-size -d 'Serve a null device of this size instead of an image (reads return without touching guest memory, writes are dropped): the transport ceiling for benchmarks' -r
complete -c vhost-user-blk -n "__fish_vhost_user_blk_needs_command" -l format -d 'Image format. `auto` serves raw unless the file starts with the qcow2 magic, which it refuses (never guesses qcow2)' -r
complete -c vhost-user-blk -n "__fish_vhost_user_blk_needs_command" -l locking -d 'Lock the image (and its backing and data files) as QEMU does, so QEMU, qemu-img and other daemons cannot write it while it is served: on, off (file systems without OFD locks; warns), or auto (on when the kernel has OFD locks)' -r
complete -c vhost-user-blk -n "__fish_vhost_user_blk_needs_command" -l create -d 'Create the image with this size (e.g. 1G, 512M, 10737418240) if it does not exist' -r
complete -c vhost-user-blk -n "__fish_vhost_user_blk_needs_command" -l num-queues -d 'Number of virtqueues offered (1..=64), each served by its own thread' -r
complete -c vhost-user-blk -n "__fish_vhost_user_blk_needs_command" -l queue-size -d 'Maximum virtqueue size (a power of two, 4..=32768); seg_max is this minus 2' -r
complete -c vhost-user-blk -n "__fish_vhost_user_blk_needs_command" -l serial -d 'Serial number returned to the guest by GET_ID (at most 20 bytes are used)' -r
complete -c vhost-user-blk -n "__fish_vhost_user_blk_needs_command" -l logical-block-size -d 'Logical block size the guest sees: 512 or 4096' -r
complete -c vhost-user-blk -n "__fish_vhost_user_blk_needs_command" -l metadata-cache -d 'qcow2: bytes of L2 tables kept in memory (e.g. 64M). Each MiB covers 8 GiB of guest space with 64 KiB clusters; the default 32M covers 256 GiB' -r
complete -c vhost-user-blk -n "__fish_vhost_user_blk_needs_command" -l poll-us -d 'After each batch, busy-poll the queue this many microseconds for more requests before sleeping (0 disables polling: lowest CPU use, higher latency)' -r
complete -c vhost-user-blk -n "__fish_vhost_user_blk_needs_command" -l inject-faults -d 'Testing only: make operations fail, e.g. write:eio:after=100:count=10 (see src/image/fault.rs)' -r
complete -c vhost-user-blk -n "__fish_vhost_user_blk_needs_command" -l discard -d 'What a guest discard does: unmap frees the space in the image and gives it back to the host file system (thin provisioning); ignore completes it without doing anything (and write-zeroes never unmaps)' -r -f -a "ignore\t'Discards complete without doing anything; write-zeroes never unmaps'
unmap\t'Discards free the space in the image and give it back to the host file system'"
complete -c vhost-user-blk -n "__fish_vhost_user_blk_needs_command" -l detect-zeroes -d 'What a write of all zero bytes becomes: off (written as is), on (a write-zeroes: a zero cluster in qcow2), unmap (also frees the space, with --discard unmap)' -r -f -a "off\t'Writes are written as they come'
on\t'A write of all zero bytes becomes a write-zeroes (a zero cluster in qcow2)'
unmap\t'Like `on`, and the space is freed too (with `--discard unmap`)'"
complete -c vhost-user-blk -n "__fish_vhost_user_blk_needs_command" -l cache -d 'QEMU\'s cache modes: none (= --direct), writeback (the default), writethrough (= --writethrough), directsync (= --direct --writethrough)' -r -f -a "none\t'O_DIRECT, write-back (the guest flushes): libvirt\'s cache=\'none\''
writeback\t'Host page cache, write-back'
writethrough\t'Host page cache, every write durable before it completes'
directsync\t'O_DIRECT, every write durable before it completes'"
complete -c vhost-user-blk -n "__fish_vhost_user_blk_needs_command" -l aio -d 'I/O engine of each queue: io_uring (every request in flight at once; falls back to sync, with a warning, where io_uring is unavailable) or sync (one request at a time on the queue\'s worker)' -r
complete -c vhost-user-blk -n "__fish_vhost_user_blk_needs_command" -l journal-dir -d 'qcow2: directory (tmpfs or ramfs) of the mapping journal, which keeps the mapping changes of completed writes until a flush writes them to the image, so that they survive a crash of the daemon. Default /dev/shm (if unusable: --no-journal, with a warning)' -r -F
complete -c vhost-user-blk -n "__fish_vhost_user_blk_needs_command" -l socket-owner -d 'Owner (user name or uid) of the --socket-path socket, e.g. the user the VMM runs as (libvirt-qemu for libvirt on Debian; needs privilege). Default: the daemon\'s user' -r
complete -c vhost-user-blk -n "__fish_vhost_user_blk_needs_command" -l socket-group -d 'Group (name or gid) of the --socket-path socket, e.g. the VMM\'s group together with --socket-mode 0660. Default: the daemon\'s group' -r
complete -c vhost-user-blk -n "__fish_vhost_user_blk_needs_command" -l socket-mode -d 'Permissions of the socket created by --socket-path, in octal' -r
complete -c vhost-user-blk -n "__fish_vhost_user_blk_needs_command" -l print-capabilities -d 'Print the vhost-user backend capabilities as JSON and exit'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_needs_command" -l read-only -d 'Serve the disk read-only: every write-like request fails with IOERR'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_needs_command" -l incoming -d 'Start as the destination of a live migration: read only what the device configuration needs, hold no lock and cache no metadata until the frontend starts the device (after the source\'s daemon handed the image over). See README, "Live migration"'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_needs_command" -l direct -d 'Open the image with O_DIRECT (bypass the host page cache)'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_needs_command" -l no-journal -d 'qcow2: no mapping journal; instead write metadata back before completing every request that changes a mapping (slower; completed writes still survive a crash of the daemon)'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_needs_command" -l writethrough -d 'Start in write-through mode: every write is durable before it completes. By default the cache is write-back and the guest flushes; the guest can switch (CONFIG_WCE)'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_needs_command" -s v -l verbose -d 'More log output (-v debug, -vv trace). RUST_LOG overrides'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_needs_command" -s V -l version -d 'Print version'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_needs_command" -f -a "ctl" -d 'Talk to a running daemon\'s control socket'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_needs_command" -f -a "manpage" -d 'Print the man page (roff) to stdout'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_needs_command" -f -a "completions" -d 'Print shell completions to stdout'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand ctl; and not __fish_seen_subcommand_from stats watch flush resize bitmaps bitmap-clear activate deactivate help" -l control-socket -d 'The daemon\'s --control-socket' -r -F
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand ctl; and not __fish_seen_subcommand_from stats watch flush resize bitmaps bitmap-clear activate deactivate help" -l json -d 'Print the raw JSON result instead of a table (before or after the action)'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand ctl; and not __fish_seen_subcommand_from stats watch flush resize bitmaps bitmap-clear activate deactivate help" -s h -l help -d 'Print help'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand ctl; and not __fish_seen_subcommand_from stats watch flush resize bitmaps bitmap-clear activate deactivate help" -f -a "stats" -d 'Per-queue and image statistics'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand ctl; and not __fish_seen_subcommand_from stats watch flush resize bitmaps bitmap-clear activate deactivate help" -f -a "watch" -d 'Refresh the statistics table once a second, with rates'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand ctl; and not __fish_seen_subcommand_from stats watch flush resize bitmaps bitmap-clear activate deactivate help" -f -a "flush" -d 'Write everything back to stable storage now'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand ctl; and not __fish_seen_subcommand_from stats watch flush resize bitmaps bitmap-clear activate deactivate help" -f -a "resize" -d 'Grow the disk online (the guest is told through the vhost-user backend channel)'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand ctl; and not __fish_seen_subcommand_from stats watch flush resize bitmaps bitmap-clear activate deactivate help" -f -a "bitmaps" -d 'List persistent dirty bitmaps'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand ctl; and not __fish_seen_subcommand_from stats watch flush resize bitmaps bitmap-clear activate deactivate help" -f -a "bitmap-clear" -d 'Clear a persistent dirty bitmap (start a new incremental-backup epoch)'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand ctl; and not __fish_seen_subcommand_from stats watch flush resize bitmaps bitmap-clear activate deactivate help" -f -a "activate" -d 'Reopen and relock the image for serving (migration handover; see docs/CONTROL.md)'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand ctl; and not __fish_seen_subcommand_from stats watch flush resize bitmaps bitmap-clear activate deactivate help" -f -a "deactivate" -d 'Flush, close and unlock the image so another process can take it; refused while the frontend has queues started'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand ctl; and not __fish_seen_subcommand_from stats watch flush resize bitmaps bitmap-clear activate deactivate help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand ctl; and __fish_seen_subcommand_from stats" -l format -d 'Output format: table (default), or prometheus text exposition' -r
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand ctl; and __fish_seen_subcommand_from stats" -l json -d 'Print the raw JSON result instead of a table (before or after the action)'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand ctl; and __fish_seen_subcommand_from stats" -s h -l help -d 'Print help'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand ctl; and __fish_seen_subcommand_from watch" -l json -d 'Print the raw JSON result instead of a table (before or after the action)'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand ctl; and __fish_seen_subcommand_from watch" -s h -l help -d 'Print help'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand ctl; and __fish_seen_subcommand_from flush" -l json -d 'Print the raw JSON result instead of a table (before or after the action)'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand ctl; and __fish_seen_subcommand_from flush" -s h -l help -d 'Print help'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand ctl; and __fish_seen_subcommand_from resize" -l json -d 'Print the raw JSON result instead of a table (before or after the action)'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand ctl; and __fish_seen_subcommand_from resize" -s h -l help -d 'Print help'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand ctl; and __fish_seen_subcommand_from bitmaps" -l json -d 'Print the raw JSON result instead of a table (before or after the action)'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand ctl; and __fish_seen_subcommand_from bitmaps" -s h -l help -d 'Print help'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand ctl; and __fish_seen_subcommand_from bitmap-clear" -l json -d 'Print the raw JSON result instead of a table (before or after the action)'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand ctl; and __fish_seen_subcommand_from bitmap-clear" -s h -l help -d 'Print help'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand ctl; and __fish_seen_subcommand_from activate" -l json -d 'Print the raw JSON result instead of a table (before or after the action)'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand ctl; and __fish_seen_subcommand_from activate" -s h -l help -d 'Print help'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand ctl; and __fish_seen_subcommand_from deactivate" -l json -d 'Print the raw JSON result instead of a table (before or after the action)'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand ctl; and __fish_seen_subcommand_from deactivate" -s h -l help -d 'Print help'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand ctl; and __fish_seen_subcommand_from help" -f -a "stats" -d 'Per-queue and image statistics'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand ctl; and __fish_seen_subcommand_from help" -f -a "watch" -d 'Refresh the statistics table once a second, with rates'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand ctl; and __fish_seen_subcommand_from help" -f -a "flush" -d 'Write everything back to stable storage now'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand ctl; and __fish_seen_subcommand_from help" -f -a "resize" -d 'Grow the disk online (the guest is told through the vhost-user backend channel)'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand ctl; and __fish_seen_subcommand_from help" -f -a "bitmaps" -d 'List persistent dirty bitmaps'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand ctl; and __fish_seen_subcommand_from help" -f -a "bitmap-clear" -d 'Clear a persistent dirty bitmap (start a new incremental-backup epoch)'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand ctl; and __fish_seen_subcommand_from help" -f -a "activate" -d 'Reopen and relock the image for serving (migration handover; see docs/CONTROL.md)'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand ctl; and __fish_seen_subcommand_from help" -f -a "deactivate" -d 'Flush, close and unlock the image so another process can take it; refused while the frontend has queues started'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand ctl; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand manpage" -s h -l help -d 'Print help'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand completions" -s h -l help -d 'Print help'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand help; and not __fish_seen_subcommand_from ctl manpage completions help" -f -a "ctl" -d 'Talk to a running daemon\'s control socket'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand help; and not __fish_seen_subcommand_from ctl manpage completions help" -f -a "manpage" -d 'Print the man page (roff) to stdout'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand help; and not __fish_seen_subcommand_from ctl manpage completions help" -f -a "completions" -d 'Print shell completions to stdout'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand help; and not __fish_seen_subcommand_from ctl manpage completions help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand help; and __fish_seen_subcommand_from ctl" -f -a "stats" -d 'Per-queue and image statistics'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand help; and __fish_seen_subcommand_from ctl" -f -a "watch" -d 'Refresh the statistics table once a second, with rates'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand help; and __fish_seen_subcommand_from ctl" -f -a "flush" -d 'Write everything back to stable storage now'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand help; and __fish_seen_subcommand_from ctl" -f -a "resize" -d 'Grow the disk online (the guest is told through the vhost-user backend channel)'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand help; and __fish_seen_subcommand_from ctl" -f -a "bitmaps" -d 'List persistent dirty bitmaps'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand help; and __fish_seen_subcommand_from ctl" -f -a "bitmap-clear" -d 'Clear a persistent dirty bitmap (start a new incremental-backup epoch)'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand help; and __fish_seen_subcommand_from ctl" -f -a "activate" -d 'Reopen and relock the image for serving (migration handover; see docs/CONTROL.md)'
complete -c vhost-user-blk -n "__fish_vhost_user_blk_using_subcommand help; and __fish_seen_subcommand_from ctl" -f -a "deactivate" -d 'Flush, close and unlock the image so another process can take it; refused while the frontend has queues started'
