// musa_fp16.h: empty stand-in for the MUSA SDK header of this name (flash_kda tests). The fake mcc only
// preprocesses translation units, so no declarations are needed.
#pragma once
