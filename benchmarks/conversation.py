"""Conversation cost: what each message costs, over C's cost.

    python3 benchmarks/conversation.py [--count N] [--rounds R] [--instructions]

Three stacks, each followed by pam_permit for the account: pam_permit alone
(no message), pam_chatty num_lines=16 (16 conversation calls of one
TEXT_INFO each) and our pam_scripted sending one call of 32 messages (16
PROMPT_ECHO_ON it checks byte for byte, 16 TEXT_INFO). A contender's cost per
message is (its time on the stack - its time on pam_permit) / messages; the
table shows it beside C's. The peers answer only PROMPT_ECHO_OFF prompts and
sit out the 32-message call. --instructions counts with callgrind instead of
timing.
"""

from __future__ import annotations

import argparse
import os

import _common
import instructions

CONTENDERS = ["C", "pamphlet", "python-pam", "pamela", "ctypes-floor"]
ONE_CALL_MESSAGES = 32


def scripted_stack(module: str, directory: str) -> str:
    import hostile_module

    prompt = (2, b"Token: ")
    info = (4, b"Working...")
    messages = [prompt if i % 2 else info for i in range(ONE_CALL_MESSAGES)]
    expect = [_common.PASSWORD.encode() if style == 2 else None for style, _ in messages]
    script = os.path.join(directory, "thirty-two")
    with open(script, "w", encoding="ascii") as file:
        file.write(hostile_module.script_text([hostile_module.Call(messages, expect=expect)]))
    return f"auth required {module} script={script}\naccount required pam_permit.so"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="transactions per run")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--instructions", action="store_true", help="callgrind counts")
    parser.add_argument("--low", type=int, default=20)
    parser.add_argument("--high", type=int, default=120)
    args = parser.parse_args()
    _common.ensure_venv()
    c_program = _common.build_c_floor()
    module = _common.build_scripted_module()
    directory = _common.scratch_dir()
    stacks = {
        "pam_permit": "auth required pam_permit.so\naccount required pam_permit.so",
        "pam_chatty x16": (
            "auth required {pam_chatty} num_lines=16 info\naccount required pam_permit.so"
        ),
        "32 in one call": scripted_stack(module, directory),
    }
    messages = {"pam_chatty x16": 16, "32 in one call": ONE_CALL_MESSAGES}
    print(_common.machine())
    if args.instructions:
        print(f"callgrind, ({args.high} - {args.low} transactions) / {args.high - args.low}\n")
    else:
        print(f"{args.count} transactions per run, {args.rounds} rounds, medians\n")
    unit = "instructions" if args.instructions else "us"
    rows = []
    with _common.services(stacks) as services:
        costs: dict[str, dict[str, float]] = {}
        for label, service in services.items():
            wanted = CONTENDERS if label != "32 in one call" else ["C", "pamphlet", "ctypes-floor"]
            contenders = _common.contenders_for(service, wanted)
            if args.instructions:
                costs[label] = {
                    name: instructions.per_transaction(
                        name, c_program, service, args.low, args.high
                    )
                    for name in contenders
                }
            else:
                costs[label] = _common.time_rounds(
                    contenders, c_program, service, args.count, args.rounds
                )
        for label, count in messages.items():
            per_message = {
                name: (cost - costs["pam_permit"][name]) / count
                for name, cost in costs[label].items()
            }
            for name, cost in per_message.items():
                shown = f"{cost / 1000:.1f} k" if args.instructions else f"{cost:.2f}"
                over = cost - per_message["C"]
                over_shown = f"{over / 1000:+.1f} k" if args.instructions else f"{over:+.2f}"
                rows.append([label, name, shown, "" if name == "C" else over_shown])
    _common.print_table(["stack", "contender", f"{unit}/message", "over C"], rows)


if __name__ == "__main__":
    main()
