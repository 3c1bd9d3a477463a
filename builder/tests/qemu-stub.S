    .intel_syntax noprefix
    .section .text
    .code32
    .globl _start
header:
    .long 0x1BADB002
    .long 0
    .long -(0x1BADB002)
_start:
    cli
    mov eax, cr4
    or eax, 0x20
    mov cr4, eax
    mov eax, [params]
    mov cr3, eax
    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x100
    wrmsr
    mov eax, cr0
    or eax, 0x80000001
    mov cr0, eax
    lgdt [gdtr]
    ljmp 0x10, offset long64
    .code64
long64:
    mov ax, 0x18
    mov ds, ax
    mov es, ax
    mov ss, ax
    lidt [rip + idtr]
    mov rsp, [rip + params + 8]
    mov rdi, [rip + params + 16]
    mov rsi, [rip + params + 24]
    mov rax, [rip + params + 32]
    jmp rax
    .balign 8
gdt:
    .quad 0
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
gdtr:
    .word 31
    .long gdt
    .balign 8
idtr:
    .word 0x0fff
    .quad 0x1234000
    .balign 8
params:
    .quad 0, 0, 0, 0, 0
