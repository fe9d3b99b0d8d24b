/* banger KVM probe guest: see banger/host/kvm.py. Rebuild the bytes kept there with
 *   as --64 -o p.o kvm-probe.S && ld -m elf_x86_64 -Ttext=0x100100 --oformat binary -o p.bin p.o
 */
    .code32
    .set BASE, 0x100000
    .set PML4, BASE + 0x1000
    .set PDPT, BASE + 0x2000
    .set PD,   BASE + 0x3000
start:
    movl $(PDPT + 3), PML4
    movl $(PD + 3), PDPT
    movl $0x83, PD
    movl %cr4, %eax
    orl $0x20, %eax
    movl %eax, %cr4
    movl $PML4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax
    movl %eax, %cr0
    lgdt gdtr
    ljmp $0x08, $long64
    .code64
long64:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %ss
    movq $0x200000, %rsp
    lidt idtr
    int3
1:  hlt
    jmp 1b
breakpoint:
    movb $0x2a, %al
    outb %al, $0xf4
2:  hlt
    jmp 2b
    .p2align 3
gdt:
    .quad 0
    .quad 0x00209A0000000000
    .quad 0x0000920000000000
gdtr:
    .word 23
    .long gdt
    .p2align 4
idtr:
    .word 4*16-1
    .quad idt
    .p2align 4
idt:
    .fill 3*16, 1, 0
    /* vector 3 (#BP): 64-bit interrupt gate, selector 0x08, -> breakpoint (< 4 GiB) */
    .word 0x0100 + (breakpoint - start)
    .word 0x08
    .word 0x8e00
    .word 0x0010
    .long 0
    .long 0
