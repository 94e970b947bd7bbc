_vhost__user__blk() {
    local i cur prev opts cmd
    COMPREPLY=()
    if [[ "${BASH_VERSINFO[0]}" -ge 4 ]]; then
        cur="$2"
    else
        cur="${COMP_WORDS[COMP_CWORD]}"
    fi
    prev="$3"
    cmd=""
    opts=""

    for i in "${COMP_WORDS[@]:0:COMP_CWORD}"
    do
        case "${cmd},${i}" in
            ",$1")
                cmd="vhost__user__blk"
                ;;
            vhost__user__blk,completions)
                cmd="vhost__user__blk__subcmd__completions"
                ;;
            vhost__user__blk,ctl)
                cmd="vhost__user__blk__subcmd__ctl"
                ;;
            vhost__user__blk,help)
                cmd="vhost__user__blk__subcmd__help"
                ;;
            vhost__user__blk,manpage)
                cmd="vhost__user__blk__subcmd__manpage"
                ;;
            vhost__user__blk__subcmd__ctl,activate)
                cmd="vhost__user__blk__subcmd__ctl__subcmd__activate"
                ;;
            vhost__user__blk__subcmd__ctl,bitmap-clear)
                cmd="vhost__user__blk__subcmd__ctl__subcmd__bitmap__subcmd__clear"
                ;;
            vhost__user__blk__subcmd__ctl,bitmaps)
                cmd="vhost__user__blk__subcmd__ctl__subcmd__bitmaps"
                ;;
            vhost__user__blk__subcmd__ctl,deactivate)
                cmd="vhost__user__blk__subcmd__ctl__subcmd__deactivate"
                ;;
            vhost__user__blk__subcmd__ctl,flush)
                cmd="vhost__user__blk__subcmd__ctl__subcmd__flush"
                ;;
            vhost__user__blk__subcmd__ctl,help)
                cmd="vhost__user__blk__subcmd__ctl__subcmd__help"
                ;;
            vhost__user__blk__subcmd__ctl,resize)
                cmd="vhost__user__blk__subcmd__ctl__subcmd__resize"
                ;;
            vhost__user__blk__subcmd__ctl,stats)
                cmd="vhost__user__blk__subcmd__ctl__subcmd__stats"
                ;;
            vhost__user__blk__subcmd__ctl,watch)
                cmd="vhost__user__blk__subcmd__ctl__subcmd__watch"
                ;;
            vhost__user__blk__subcmd__ctl__subcmd__help,activate)
                cmd="vhost__user__blk__subcmd__ctl__subcmd__help__subcmd__activate"
                ;;
            vhost__user__blk__subcmd__ctl__subcmd__help,bitmap-clear)
                cmd="vhost__user__blk__subcmd__ctl__subcmd__help__subcmd__bitmap__subcmd__clear"
                ;;
            vhost__user__blk__subcmd__ctl__subcmd__help,bitmaps)
                cmd="vhost__user__blk__subcmd__ctl__subcmd__help__subcmd__bitmaps"
                ;;
            vhost__user__blk__subcmd__ctl__subcmd__help,deactivate)
                cmd="vhost__user__blk__subcmd__ctl__subcmd__help__subcmd__deactivate"
                ;;
            vhost__user__blk__subcmd__ctl__subcmd__help,flush)
                cmd="vhost__user__blk__subcmd__ctl__subcmd__help__subcmd__flush"
                ;;
            vhost__user__blk__subcmd__ctl__subcmd__help,help)
                cmd="vhost__user__blk__subcmd__ctl__subcmd__help__subcmd__help"
                ;;
            vhost__user__blk__subcmd__ctl__subcmd__help,resize)
                cmd="vhost__user__blk__subcmd__ctl__subcmd__help__subcmd__resize"
                ;;
            vhost__user__blk__subcmd__ctl__subcmd__help,stats)
                cmd="vhost__user__blk__subcmd__ctl__subcmd__help__subcmd__stats"
                ;;
            vhost__user__blk__subcmd__ctl__subcmd__help,watch)
                cmd="vhost__user__blk__subcmd__ctl__subcmd__help__subcmd__watch"
                ;;
            vhost__user__blk__subcmd__help,completions)
                cmd="vhost__user__blk__subcmd__help__subcmd__completions"
                ;;
            vhost__user__blk__subcmd__help,ctl)
                cmd="vhost__user__blk__subcmd__help__subcmd__ctl"
                ;;
            vhost__user__blk__subcmd__help,help)
                cmd="vhost__user__blk__subcmd__help__subcmd__help"
                ;;
            vhost__user__blk__subcmd__help,manpage)
                cmd="vhost__user__blk__subcmd__help__subcmd__manpage"
                ;;
            vhost__user__blk__subcmd__help__subcmd__ctl,activate)
                cmd="vhost__user__blk__subcmd__help__subcmd__ctl__subcmd__activate"
                ;;
            vhost__user__blk__subcmd__help__subcmd__ctl,bitmap-clear)
                cmd="vhost__user__blk__subcmd__help__subcmd__ctl__subcmd__bitmap__subcmd__clear"
                ;;
            vhost__user__blk__subcmd__help__subcmd__ctl,bitmaps)
                cmd="vhost__user__blk__subcmd__help__subcmd__ctl__subcmd__bitmaps"
                ;;
            vhost__user__blk__subcmd__help__subcmd__ctl,deactivate)
                cmd="vhost__user__blk__subcmd__help__subcmd__ctl__subcmd__deactivate"
                ;;
            vhost__user__blk__subcmd__help__subcmd__ctl,flush)
                cmd="vhost__user__blk__subcmd__help__subcmd__ctl__subcmd__flush"
                ;;
            vhost__user__blk__subcmd__help__subcmd__ctl,resize)
                cmd="vhost__user__blk__subcmd__help__subcmd__ctl__subcmd__resize"
                ;;
            vhost__user__blk__subcmd__help__subcmd__ctl,stats)
                cmd="vhost__user__blk__subcmd__help__subcmd__ctl__subcmd__stats"
                ;;
            vhost__user__blk__subcmd__help__subcmd__ctl,watch)
                cmd="vhost__user__blk__subcmd__help__subcmd__ctl__subcmd__watch"
                ;;
            *)
                ;;
        esac
    done

    case "${cmd}" in
        vhost__user__blk)
            opts="-v -h -V --control-socket --control-socket-owner --control-socket-group --control-socket-mode --socket-path --fd --print-capabilities --blk-file --null-size --read-only --format --locking --incoming --create --num-queues --queue-size --serial --logical-block-size --metadata-cache --poll-us --inject-faults --direct --discard --detect-zeroes --cache --aio --journal-dir --no-journal --writethrough --socket-owner --socket-group --socket-mode --verbose --help --version ctl manpage completions help"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 1 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --control-socket)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --control-socket-owner)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --control-socket-group)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --control-socket-mode)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --socket-path)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --fd)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --blk-file)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --null-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --format)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --locking)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --create)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --num-queues)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --queue-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --serial)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --logical-block-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --metadata-cache)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --poll-us)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --inject-faults)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --discard)
                    COMPREPLY=($(compgen -W "ignore unmap" -- "${cur}"))
                    return 0
                    ;;
                --detect-zeroes)
                    COMPREPLY=($(compgen -W "off on unmap" -- "${cur}"))
                    return 0
                    ;;
                --cache)
                    COMPREPLY=($(compgen -W "none writeback writethrough directsync" -- "${cur}"))
                    return 0
                    ;;
                --aio)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --journal-dir)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --socket-owner)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --socket-group)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --socket-mode)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        vhost__subcmd__user__subcmd__blk__subcmd__completions)
            opts="-h --help bash elvish fish powershell zsh"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 2 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        vhost__subcmd__user__subcmd__blk__subcmd__ctl)
            opts="-h --control-socket --json --help stats watch flush resize bitmaps bitmap-clear activate deactivate help"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 2 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --control-socket)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        vhost__subcmd__user__subcmd__blk__subcmd__ctl__subcmd__activate)
            opts="-h --json --help"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        vhost__subcmd__user__subcmd__blk__subcmd__ctl__subcmd__bitmap__subcmd__clear)
            opts="-h --json --help"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        vhost__subcmd__user__subcmd__blk__subcmd__ctl__subcmd__bitmaps)
            opts="-h --json --help"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        vhost__subcmd__user__subcmd__blk__subcmd__ctl__subcmd__deactivate)
            opts="-h --json --help"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        vhost__subcmd__user__subcmd__blk__subcmd__ctl__subcmd__flush)
            opts="-h --json --help"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        vhost__subcmd__user__subcmd__blk__subcmd__ctl__subcmd__help)
            opts="stats watch flush resize bitmaps bitmap-clear activate deactivate help"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        vhost__subcmd__user__subcmd__blk__subcmd__ctl__subcmd__help__subcmd__activate)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        vhost__subcmd__user__subcmd__blk__subcmd__ctl__subcmd__help__subcmd__bitmap__subcmd__clear)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        vhost__subcmd__user__subcmd__blk__subcmd__ctl__subcmd__help__subcmd__bitmaps)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        vhost__subcmd__user__subcmd__blk__subcmd__ctl__subcmd__help__subcmd__deactivate)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        vhost__subcmd__user__subcmd__blk__subcmd__ctl__subcmd__help__subcmd__flush)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        vhost__subcmd__user__subcmd__blk__subcmd__ctl__subcmd__help__subcmd__help)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        vhost__subcmd__user__subcmd__blk__subcmd__ctl__subcmd__help__subcmd__resize)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        vhost__subcmd__user__subcmd__blk__subcmd__ctl__subcmd__help__subcmd__stats)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        vhost__subcmd__user__subcmd__blk__subcmd__ctl__subcmd__help__subcmd__watch)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        vhost__subcmd__user__subcmd__blk__subcmd__ctl__subcmd__resize)
            opts="-h --json --help"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        vhost__subcmd__user__subcmd__blk__subcmd__ctl__subcmd__stats)
            opts="-h --format --json --help"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --format)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        vhost__subcmd__user__subcmd__blk__subcmd__ctl__subcmd__watch)
            opts="-h --json --help"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        vhost__subcmd__user__subcmd__blk__subcmd__help)
            opts="ctl manpage completions help"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 2 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        vhost__subcmd__user__subcmd__blk__subcmd__help__subcmd__completions)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        vhost__subcmd__user__subcmd__blk__subcmd__help__subcmd__ctl)
            opts="stats watch flush resize bitmaps bitmap-clear activate deactivate"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        vhost__subcmd__user__subcmd__blk__subcmd__help__subcmd__ctl__subcmd__activate)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        vhost__subcmd__user__subcmd__blk__subcmd__help__subcmd__ctl__subcmd__bitmap__subcmd__clear)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        vhost__subcmd__user__subcmd__blk__subcmd__help__subcmd__ctl__subcmd__bitmaps)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        vhost__subcmd__user__subcmd__blk__subcmd__help__subcmd__ctl__subcmd__deactivate)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        vhost__subcmd__user__subcmd__blk__subcmd__help__subcmd__ctl__subcmd__flush)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        vhost__subcmd__user__subcmd__blk__subcmd__help__subcmd__ctl__subcmd__resize)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        vhost__subcmd__user__subcmd__blk__subcmd__help__subcmd__ctl__subcmd__stats)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        vhost__subcmd__user__subcmd__blk__subcmd__help__subcmd__ctl__subcmd__watch)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        vhost__subcmd__user__subcmd__blk__subcmd__help__subcmd__help)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        vhost__subcmd__user__subcmd__blk__subcmd__help__subcmd__manpage)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        vhost__subcmd__user__subcmd__blk__subcmd__manpage)
            opts="-h --help"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 2 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
    esac
}

if [[ "${BASH_VERSINFO[0]}" -eq 4 && "${BASH_VERSINFO[1]}" -ge 4 || "${BASH_VERSINFO[0]}" -gt 4 ]]; then
    complete -F _vhost__user__blk -o nosort -o bashdefault -o default vhost-user-blk
else
    complete -F _vhost__user__blk -o bashdefault -o default vhost-user-blk
fi
